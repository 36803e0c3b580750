"""SLURM plumbing of launch/submit.py: the submitit task, job states, run planning.

Kept out of ``masan/`` so the training package never imports submitit or SLURM tools.
"""
