"""What the converter makes of headers that do not say enough: a file without orientation, a
corrupt frame deep in a 4D run. Each case names the file and says what to do."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np

from masan.store.cohort import CohortStore

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("to_zarr", ROOT / "data_tools" / "to_zarr.py")
to_zarr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(to_zarr)

ZOOMS = (1.0, 1.2, 1.5)


def _save(path: Path, data: np.ndarray, oriented: bool = True) -> Path:
    """A NIfTI-1 file of ``data`` with 1.0 x 1.2 x 1.5 mm voxels (2 s frames when 4D);
    ``oriented=False``: sform and qform codes 0, as ANALYZE-era conversions leave them."""
    img = nib.Nifti1Image(data, np.diag([*ZOOMS, 1.0]) if oriented else None)  # no affine: both codes stay 0
    img.header.set_zooms(ZOOMS + ((2.0,) if data.ndim == 4 else ()))
    nib.save(img, path)
    back = nib.load(path).header
    assert bool(back["sform_code"] or back["qform_code"]) == oriented
    return path


def _cohort(tmp: Path, t1_oriented: bool = True, fmri: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    """A manifest of two subjects; the T1 of ``odd`` is lopsided (its x order is visible) and
    unoriented when ``t1_oriented`` is False; ``fmri``: odd's run (default: a finite one)."""
    rng = np.random.default_rng(0)
    t1 = rng.normal(100, 10, (10, 11, 12)).astype(np.float32)
    t1[:3] += 50  # a brighter side: a flip of x shows
    run = rng.normal(50, 5, (8, 8, 8, 6)).astype(np.float32)
    rows = []
    for subject, label in (("odd", "AD"), ("ok", "NC")):
        folder = tmp / subject
        folder.mkdir()
        rows.append((subject, _save(folder / "t1.nii.gz", t1, t1_oriented or subject == "ok"),
                     _save(folder / "bold.nii.gz", fmri if fmri is not None and subject == "odd" else run), label))
    manifest = tmp / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("subject", "t1", "fmri", "label"), *rows])
    return manifest, t1


def test_a_file_without_orientation_is_refused_unless_las_is_assumed(tmp_path):
    """sform and qform codes 0: nibabel (and FSL) assume LAS, other tools other orders, so the
    head's left and right are a guess: by default its subject fails with the fix; with
    --unoriented assume-las it is converted under that assumption, with a warning."""
    manifest, t1 = _cohort(tmp_path, t1_oriented=False)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress"]) == 1
    store = CohortStore(out)
    assert store.subjects == ["ok"]
    (failed,) = store.report()["failed"]
    assert failed["subject"] == "odd"
    for fragment in ("odd/t1.nii.gz", "states no orientation", "sform_code and qform_code are 0",
                     "img.set_sform(affine, code=1)", "--unoriented assume-las"):
        assert fragment in failed["error"], (fragment, failed["error"])

    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress",
                         "--unoriented", "assume-las"]) == 0
    store = CohortStore(out)
    assert store.subjects == ["odd", "ok"]
    # LAS reoriented to RAS: x reversed, as nibabel's affine for such a header says
    assert np.array_equal(store.read_t1("odd", normalize=False), t1[::-1])
    assert np.array_equal(store.read_t1("ok", normalize=False), t1)
    assert any("odd/t1.nii.gz" in w and "assumed LAS" in w for w in store.report()["warnings"])


def test_a_bad_frame_is_named_by_its_index(tmp_path):
    run = np.random.default_rng(1).normal(50, 5, (8, 8, 8, 6)).astype(np.float32)
    run[2, 3, 4, 5] = np.inf
    manifest, _ = _cohort(tmp_path, fmri=run)
    out = tmp_path / "s.zarr"
    # slabs (shards) of 2 frames: the Inf lies in the third slab (frames 4-5), at its second frame
    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress",
                         "--fmri-chunk-frames", "2", "--fmri-shard-frames", "2"]) == 1
    (failed,) = CohortStore(out).report()["failed"]
    assert "odd/bold.nii.gz: 1 voxels are +-Inf (the first in frame 5)" in failed["error"], failed["error"]
