"""SLURM plumbing of launch/submit.py: run planning and resources (plan), the submitit executor
and job records (submission), the task each rank runs (task), job states and jobs.json (jobs).

Kept out of ``masan/`` so the training package never imports submitit or SLURM tools.
"""
