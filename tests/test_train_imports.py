"""Training depends on inference only: no module of masan.train imports matplotlib or masan.evaluate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_MODULES = sorted(p.stem for p in (REPO / "masan" / "train").glob("*.py") if p.stem != "__init__")


def test_training_imports_neither_matplotlib_nor_evaluation():
    modules = ["masan.inference", "masan.predictions", "masan.predict", *("masan.train." + m for m in TRAIN_MODULES)]
    code = (f"import {', '.join(modules)}\n"
            "import sys\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
            "bad = sorted(m for m in sys.modules if m.startswith('masan.evaluate'))\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"loop", "run", "logging", "engine", "checkpoint"} <= set(TRAIN_MODULES)
