"""The huge-pages re-run of the command-line entry points: when it applies, and that a
command run through it sees the tunable (and still works)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tinyllm_jax import hugepages


def test_wanted_only_where_it_can_help(monkeypatch):
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert hugepages.wanted({})
    assert not hugepages.wanted({"TINYLLM_HUGEPAGES": "0"})
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice stands
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("", ""))
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages.sys, "platform", "darwin")
    assert not hugepages.wanted({})


@pytest.mark.skipif(not hugepages.wanted(), reason="no glibc >= 2.35 here")
def test_the_command_reruns_itself_with_the_tunable(tmp_path):
    probe = tmp_path / "probe.py"  # a stand-in module: prints what the re-run process sees
    probe.write_text("import os, sys\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from tinyllm_jax.hugepages import reexec_with_huge_pages\n"
            "reexec_with_huge_pages('probe', ['a', 'b c'])\nprint('not replaced')\n") % str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TINYLLM_HUGEPAGES")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "glibc.malloc.hugetlb=1 ['a', 'b c']"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TINYLLM_HUGEPAGES": "0"},
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "not replaced"
