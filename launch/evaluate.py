#!/usr/bin/env python
"""Evaluate finished runs: the same command as ``python -m masan.evaluate`` (see --help).

    python launch/evaluate.py runs/masan runs/hfcn --out reports/table2 --store runs/cohort.zarr
"""

import sys

from masan.evaluate.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
