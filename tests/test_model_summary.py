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


def test_summary_takes_the_configs_precision_and_says_where_null_shapes_come_from(capsys, tiny_store):
    """The activation dtype is the config's unless --dtype says otherwise; null input shapes are
    read from data.store as a training start reads them, or named when there is no store."""
    assert main(["train.precision=fp32"]) == 0
    assert "feature map per level (fp32;" in capsys.readouterr().out
    assert main(["train.precision=fp32", "--dtype", "bf16"]) == 0
    assert "feature map per level (bf16;" in capsys.readouterr().out
    assert main(["model.t1_shape=null", "data.store=/nonexistent.zarr"]) == 2
    assert "model.t1_shape null: taken from the store" in capsys.readouterr().err
    assert main(["model.t1_shape=null", "model.fmri_shape=null", "model.fmri_frames=null", "model.patch_grid=[2,2,2]",
                 f"data.store={tiny_store}", "data.classes=[NC,AD]"]) == 0
    assert "T1 = all 8 patches" in capsys.readouterr().out
