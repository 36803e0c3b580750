"""End to end on real parts: a synthesized cohort converted to a Zarr store, the real MASAN
and H-FCN models, predict() over CohortDataset loaders, then the evaluate CLI with the store
(region maps over T1 slices) and a real NIfTI atlas naming the regions."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from masan.config import config_from_dict, save_config
from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.data.dataset import CohortDataset, select_subjects
from masan.data.splits import make_split
from masan.evaluate.__main__ import main
from masan.evaluate.region_ranking import atlas_region_names, resample_atlas
from masan.inference import predict
from masan.model import build_model, small_model_config
from masan.predictions import write_predictions
from masan.rundir import RunDir
from masan.store.cohort import CohortStore
from masan.synth.phantom import synthesize_cohort

HIPPOCAMPUS, CORTEX = 17, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    bids = synthesize_cohort(root / "bids", n_per_class=4, t1_shape=(32, 32, 32), fmri_shape=(16, 16, 16), frames=6)
    convert_cohort(discover_bids(bids), root / "cohort.zarr", ConvertOptions(), progress=False)
    return root / "cohort.zarr"


def train_free_run(run_dir, store, repeat: int, arch: str = "masan"):
    """A run directory as training leaves it, with an untrained model's test predictions."""
    model_cfg = small_model_config(arch=arch)
    cfg = config_from_dict({"model": vars(model_cfg)}, [
        f"run_dir={run_dir}", f"data.store={store}", "data.classes=[NC, MCI, AD]",
        "data.merge={EMCI: MCI, LMCI: MCI}", f"data.fmri_frames={model_cfg.fmri_frames}",
        f"split.repeat={repeat}", "data.num_workers=0"])
    save_config(cfg, run_dir / "config.yaml")
    subjects, labels, classes = select_subjects(store, cfg.data)
    split = make_split(subjects, labels, cfg.split)
    split.save(RunDir(run_dir).split)
    test_labels = [split.labels[s] for s in split.test]
    loader = DataLoader(CohortDataset(store, split.test, test_labels, cfg.data), batch_size=2)
    torch.manual_seed(repeat)
    preds = predict(build_model(cfg.model, len(classes)), loader, "cpu", class_names=classes)
    write_predictions(preds, run_dir, classes, cfg.data.positive_class)
    RunDir(run_dir).mark_done(cfg, step=1, epochs_done=sum(cfg.epochs.values()))
    return preds, split


def write_atlas(path, store_path, subject):
    """Half-resolution label volume in the T1's world space: cell (0, 0, 0) of the 2x2x2 grid
    is 'Hippocampus', the rest 'Cortex'; plus its label table."""
    s = CohortStore(store_path)
    shape, affine = s.read_t1(subject).shape, s.affine(subject, "t1")
    half = np.full([n // 2 for n in shape], CORTEX, np.int16)
    half[: shape[0] // 4, : shape[1] // 4, : shape[2] // 4] = HIPPOCAMPUS
    scale = np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])  # 2x2x2 T1 voxels each
    nib.save(nib.Nifti1Image(half, affine @ scale), path / "atlas.nii.gz")
    (path / "atlas.tsv").write_text(f"index\tname\n{CORTEX}\tCortex\n{HIPPOCAMPUS}\tHippocampus\n")
    return path / "atlas.nii.gz", path / "atlas.tsv"


def test_resampled_atlas_names_the_grid_cells(store, tmp_path):
    subject = CohortStore(store).subjects[0]
    atlas, table = write_atlas(tmp_path, store, subject)
    s = CohortStore(store)
    labels = resample_atlas(atlas, s.read_t1(subject).shape, s.affine(subject, "t1"))
    assert (labels[:16, :16, :16] == HIPPOCAMPUS).all() and (labels[16:] == CORTEX).all()
    names = atlas_region_names(labels, [2, 2, 2], {HIPPOCAMPUS: "Hippocampus", CORTEX: "Cortex"})
    assert names[0] == "Hippocampus (x0-y0-z0)" and names[7] == "Cortex (x1-y1-z1)"


def test_predict_real_models_and_report_with_figures(store, tmp_path, capsys):
    runs = tmp_path / "runs"
    preds, split = train_free_run(runs / "masan_r0", store, 0)
    train_free_run(runs / "masan_r1", store, 1)
    train_free_run(runs / "hfcn_r0", store, 0, arch="hfcn")
    assert preds.subjects == split.test
    assert preds.probs.shape == (len(split.test), 3) and preds.region_weights.shape == (len(split.test), 8)
    np.testing.assert_allclose(preds.region_weights.sum(1), 1, atol=1e-5)  # model contract

    ad_test = [s for s in split.test if split.labels[s] == 2]
    atlas, table = write_atlas(tmp_path, store, ad_test[0])
    out = tmp_path / "report"
    code = main([str(runs), "--out", str(out), "--store", str(store), "--atlas", str(atlas),
                 "--atlas-labels", str(table)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| MASAN | 2 |" in printed.out and "| H-FCN | 1 |" in printed.out
    figures = out / "figures"
    for stem in ("masan", "h-fcn"):
        with (figures / f"{stem}_region_ranking.csv").open() as f:
            names = {row["name"] for row in csv.DictReader(f)}
        assert "Hippocampus (x0-y0-z0)" in names
        subject_map = figures / f"{stem}_region_map_{ad_test[0]}.png"
        assert subject_map.stat().st_size > 10_000, "region map over the T1 of the first AD test subject"
        assert (figures / f"{stem}_region_map_mean_ad.png").is_file()
    assert json.loads((out / "table.json").read_text())["skipped"] == []
