"""SLURM plumbing of launch/submit.py: run planning and resources (plan), the submitit executor
and job records (submission), the task each rank runs (task), job states and jobs.json (jobs),
what SLURM says about a job now (queue: squeue, submitit's result file), whether a job fits
its partition (partition: sinfo).

Kept out of ``masan/`` so the training package never imports submitit or SLURM tools.
"""
