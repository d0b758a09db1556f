"""What training, evaluation and the recipes share beneath them: the device mesh and its
sharding rules (`sharding.py`) and Orbax checkpoints (`checkpoint.py`)."""
