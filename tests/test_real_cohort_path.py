"""The README path on a cohort shaped like ADNI3 (several scanners), walked with the real
command-line tools: every step works, or stops with exit 2 and a message naming the subject,
file or key and the fix; none is silently wrong, none prints a traceback, and a refused
training start leaves the run directory as it was.

The cohort (written with nibabel): T1 at 2.0 and 2.4 mm; RAS, LAS and a sagittal PSR
acquisition; a qform-only header; int16 with scaling and float32; BOLD of 5-7 frames at TR
2 s (header in s or ms, or only in the JSON sidecar) and one scanner at 0.8 s; sessions
ses-bl/ses-m12; a subject with two runs; participants.tsv with a BOM, CRLF, ``DX_bl``,
ADNI's ``CN``/``Dementia`` and two new patients without a diagnosis.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
T1_SHAPE, BOLD_SHAPE = (24, 26, 22), (12, 13, 11)
CENTRE_MM = np.array([4.0, -6.0, 2.0])
"""World position of the 'lesion' ball every scan holds (what the geometry must keep)."""

pytestmark = pytest.mark.slow


def _affine(shape: tuple[int, ...], zoom: float, perm: tuple[int, int, int], flip: bool) -> np.ndarray:
    a = np.zeros((4, 4))
    for vox_axis, world_axis in enumerate(perm):
        a[world_axis, vox_axis] = -zoom if (flip and vox_axis == 0) else zoom
    a[3, 3] = 1.0
    a[:3, 3] = -a[:3, :3] @ (np.array(shape[:3]) - 1) / 2
    return a


def _ball(shape: tuple[int, ...], affine: np.ndarray, radius_mm: float, rng) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(world - CENTRE_MM, axis=-1) < radius_mm) * 800.0 + rng.normal(100, 10, shape[:3])


def scan(folder: Path, sid: str, rng, *, zoom=2.0, perm=(0, 1, 2), flip=False, qform_only=False, float32=False,
         tr=2.0, time_unit="sec", sidecar_tr=None, frames=6, extra_run=False, session=None) -> None:
    """One subject's T1w and BOLD in BIDS layout, as its scanner wrote them."""
    base = folder / sid / session if session else folder / sid
    prefix = f"{sid}_{session}" if session else sid
    (base / "anat").mkdir(parents=True), (base / "func").mkdir(parents=True)
    t1_aff = _affine(T1_SHAPE, zoom, perm, flip)
    t1 = nib.Nifti1Image(_ball(T1_SHAPE, t1_aff, 7, rng).astype(np.float32), t1_aff)
    t1.set_data_dtype(np.float32 if float32 else np.int16)  # int16: nibabel stores it scaled
    if qform_only:
        t1.set_sform(None, code=0)
        t1.set_qform(t1_aff, code=1)
    nib.save(t1, base / "anat" / f"{prefix}_T1w.nii.gz")
    bold_aff = _affine(BOLD_SHAPE, 2 * zoom, perm, flip)
    series = np.repeat(_ball(BOLD_SHAPE, bold_aff, 7, rng)[..., None], frames, axis=3) + rng.normal(0, 5, BOLD_SHAPE
                                                                                                     + (frames,))
    bold = nib.Nifti1Image(series.astype(np.int16), bold_aff)
    bold.header.set_xyzt_units("mm", time_unit)
    bold.header["pixdim"][4] = tr
    runs = ["task-rest"] + (["task-faces"] if extra_run else [])
    for task in runs:
        nib.save(bold, base / "func" / f"{prefix}_{task}_bold.nii.gz")
    if sidecar_tr is not None:
        (base / "func" / f"{prefix}_task-rest_bold.json").write_text(json.dumps({"RepetitionTime": sidecar_tr}))


def write_cohort(bids: Path) -> None:
    rng = np.random.default_rng(7)
    scanners = {
        "sub-01": {}, "sub-02": {"sidecar_tr": 2.0, "tr": 0.0}, "sub-03": {"session": "ses-bl"},
        "sub-04": {"extra_run": True}, "sub-05": {"float32": True}, "sub-06": {"tr": 2000.0, "time_unit": "msec"},
        "sub-07": {"zoom": 2.4, "flip": True}, "sub-08": {"zoom": 2.4, "flip": True, "qform_only": True},
        "sub-09": {"perm": (1, 2, 0)}, "sub-10": {"perm": (1, 2, 0), "frames": 7},
        "sub-11": {"zoom": 2.4}, "sub-12": {"frames": 5},
        "sub-fast": {"sidecar_tr": 0.8, "tr": 0.8},  # another scanner's TR
        "sub-new1": {}, "sub-new2": {"zoom": 2.4, "flip": True},
    }
    for sid, kw in scanners.items():
        scan(bids, sid, rng, **kw)
    scan(bids, "sub-03", rng, session="ses-m12")
    dx = {"sub-01": "CN", "sub-02": "Dementia", "sub-03": "CN", "sub-04": "Dementia", "sub-05": "CN",
          "sub-06": "Dementia", "sub-07": "CN", "sub-08": "Dementia", "sub-09": "CN", "sub-10": "Dementia",
          "sub-11": "CN", "sub-12": "Dementia", "sub-fast": "CN", "sub-new1": "n/a", "sub-new2": ""}
    with (bids / "participants.tsv").open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\r\n")
        w.writerow(["participant_id", "age", "DX_bl"])
        w.writerows([s, 70, d] for s, d in dx.items())


def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         check=False)
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    return res


def test_a_many_scanner_cohort_walks_the_readme_path(tmp_path):
    bids, store = tmp_path / "bids", tmp_path / "adni3.zarr"
    write_cohort(bids)
    convert = ["data_tools/to_zarr.py", "--bids", str(bids), "--label-column", "DX_bl", "--label-map",
               "Dementia=AD", "--classes", "NC", "AD", "--allow-unlabeled", "--no-progress"]

    # as-is (only cropped): the voxel sizes differ, which training refuses rather than learning from
    asis = run(*convert, "--out", str(tmp_path / "asis.zarr"), "--t1-shape", "24", "24", "24", "--fmri-shape",
               "12", "12", "12")
    assert asis.returncode == 0, asis.stderr[-3000:]
    cfg = tmp_path / "tiny.yaml"
    tiny = yaml.safe_load((REPO / "hpc/configs/tiny.yaml").read_text())
    tiny["model"].update(t1_shape=None, fmri_shape=None, fmri_frames=None)
    tiny["data"]["fmri_frames"] = 5
    tiny["train"] = {"pretrain_epochs": 1, "joint_epochs": 1, "precision": "fp32", "device": "cpu"}
    tiny["optim"] = {"micro_batch": 2}
    cfg.write_text(yaml.safe_dump(tiny))
    refused = run("launch/train_local.py", "--config", str(cfg), f"run_dir={tmp_path / 'r0'}",
                  f"data.store={tmp_path / 'asis.zarr'}")
    assert refused.returncode == 2 and "voxel sizes" in refused.stderr and "--spacing" in refused.stderr
    assert not (tmp_path / "r0").exists()

    # one voxel size, RAS (the default): converts, with the choices and unit fixes said
    res = run(*convert, "--out", str(store), "--spacing", "2", "4", "--t1-shape", "24", "24", "24",
              "--fmri-shape", "12", "12", "12")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 sessions; used ses-bl" in res.stdout and "2 BOLD files; used sub-04_task-rest_bold" in res.stdout
    assert run("data_tools/inspect_store.py", str(store)).returncode == 0

    qc = run("data_tools/qc_report.py", str(store), "--out", str(tmp_path / "qc"))
    assert qc.returncode == 0, qc.stderr[-3000:]
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "sub-fast" in page and "0.8 s" in page  # the other scanner's TR, flagged

    train = ["launch/train_local.py", "--config", str(cfg), f"run_dir={tmp_path / 'r1'}", f"data.store={store}"]
    refused = run(*train)
    assert refused.returncode == 2 and "different TRs" in refused.stderr and "sub-fast" in refused.stderr
    assert not (tmp_path / "r1").exists()

    # the 0.8 s subject leaves the cohort (its own store would hold that scanner's runs)
    shutil.move(bids / "sub-fast", tmp_path / "sub-fast")
    table = (bids / "participants.tsv").read_text(encoding="utf-8-sig").splitlines()
    (bids / "participants.tsv").write_text("\r\n".join(r for r in table if not r.startswith("sub-fast")) + "\r\n")
    res = run(*convert, "--out", str(store), "--spacing", "2", "4", "--t1-shape", "24", "24", "24",
              "--fmri-shape", "12", "12", "12", "--prune")
    assert res.returncode == 0 and "1 removed" in res.stdout, res.stdout + res.stderr[-3000:]
    done = run(*train)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left out of training: sub-new1, sub-new2" in done.stderr
    geo = json.loads((tmp_path / "r1" / "store_geometry.json").read_text())
    assert geo["orientation"] == "RAS" and geo["t1_spacing_mm"] == [2.0] * 3 and geo["tr_seconds"] == 2.0

    pred = run("-m", "masan.predict", str(tmp_path / "r1"), "--store", str(store), "--out", str(tmp_path / "p"))
    assert pred.returncode == 0 and "2 without a diagnosis" in pred.stdout, pred.stderr[-3000:]
    rows = {r["subject"]: r for r in csv.DictReader((tmp_path / "p" / "predictions.csv").open())}
    assert rows["sub-new1"]["label"] == "" and rows["sub-new2"]["label"] == "" and rows["sub-01"]["label"] == "NC"
    wrong = run("-m", "masan.predict", str(tmp_path / "r1"), "--store", str(tmp_path / "asis.zarr"), "--out",
                str(tmp_path / "p2"))
    assert wrong.returncode == 2 and "voxel sizes" in wrong.stderr and not (tmp_path / "p2").exists()
