"""The benchmarks: model step, GPU check, step profile, I/O, training throughput: how fast the
code runs (whether the model learns what it should is experiments/'s question).

Run each from the repository root as a module, e.g. ``python -m bench.gpu_check --tiny``:
``bench`` and ``masan`` then import with the repository as the only path entry (the working
directory), and no script edits ``sys.path``. :mod:`bench.harness` holds what the model
benches share.
"""
