"""Training engine: DeepSpeed on every rank, two phases, complete checkpoints, TensorBoard.

Modules, one idea each (the process group and device are :mod:`masan.distributed`, a layer
below, which the data cache uses too): :mod:`~masan.train.engine` (derived DeepSpeed config, Adam, LR schedule),
:mod:`~masan.train.checkpoint` (complete checkpoints and resume),
:mod:`~masan.train.eta` (a run's ETA and its text),
:mod:`~masan.train.gradients` (gradient norms, the non-finite guard, skipped steps),
:mod:`~masan.train.logging` (TensorBoard on rank 0), :mod:`~masan.train.loop` (the loop),
:mod:`~masan.train.run` (``run_training``), :mod:`~masan.train.runlock` (one writer per run
directory), :mod:`~masan.train.stop` (stop requests).
"""
