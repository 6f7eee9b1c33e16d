"""The trainer behind ``train.py``: config, task stream, mesh, jitted step, loop, checkpoints."""
