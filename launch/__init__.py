"""Launchers: SLURM submission (submit.py, slurm/), its runs without SLURM (local_runs.py), local
training (train_local.py), the demo."""
