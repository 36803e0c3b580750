"""`python -m masan.model.summary` at full resolution (meta device, no memory)."""

import re
import subprocess
import sys

from masan.model.summary import main


def test_summary_reports_parameters_and_levels_at_full_resolution(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    assert "T1 240x256x176 as 4x4x4 patches" in text and "976 frames of 60x64x44" in text
    total = int(re.search(r"total ([\d,]+)", text).group(1).replace(",", ""))
    assert total > 1_000_000
    # Table 1 levels of one 60x64x44 patch, 64 patches per sample
    for level, spatial in enumerate(["60x64x44", "30x32x22", "15x16x11", "8x8x6"]):
        assert re.search(rf"T1\s+{level}\s+\d+\s+{spatial}", text), spatial
    on_off = re.search(r"total\s+([\d.]+)\s+([\d.]+)", text)
    assert float(on_off.group(2)) < float(on_off.group(1))  # checkpointing keeps less


def test_summary_command_line_accepts_overrides_and_rejects_bad_keys(capsys):
    assert main(["model.arch=hfcn", "--classes", "2"]) == 0
    assert "hfcn model, 2 classes" in capsys.readouterr().out
    bad = subprocess.run([sys.executable, "-m", "masan.model.summary", "model.no_such_key=1"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr
