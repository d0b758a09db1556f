"""User-facing errors: the CLI prints their message (file, line or key, expected, found)
and exits with status 2, with no traceback and no partial output."""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a model path."""
