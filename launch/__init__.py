"""Launchers: SLURM submission (submit.py, slurm/), local training (train_local.py), the demo."""
