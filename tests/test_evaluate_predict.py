"""predict() over real DataLoaders (missing modality, bf16 autocast, padded distributed
sampling with a real 2-process gloo group) and the run directory's prediction files."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from masan.config import load_config
from masan.inference import gather_predictions, predict, predict_subjects
from masan.metrics import flat_scalars, prediction_metrics
from masan.predictions import (
    Predictions,
    PredictionsError,
    decide,
    load_predictions,
    merge_predictions,
    unsmoothed,
    write_predictions,
)

CLASSES = ["NC", "MCI", "AD"]
GRID = 8  # 2x2x2 regions


class ToyCohort(Dataset):
    """CohortDataset-shaped items; class c has mean intensity c, fMRI absent when ``fmri=False``."""

    def __init__(self, n: int, fmri: bool = True):
        self.subjects = [f"sub-{i:02d}" for i in range(n)]
        self.labels = [i % 3 for i in range(n)]
        self.fmri = fmri

    def __len__(self):
        return len(self.subjects)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        item = {"t1": torch.randn(1, 4, 4, 4, generator=g) * 0.1 + self.labels[i],
                "label": torch.tensor(self.labels[i]), "index": torch.tensor(i)}
        if self.fmri:
            item["fmri"] = torch.randn(3, 2, 2, 2, generator=g)
        return item


class ToyModel(nn.Module):
    """Returns the MASAN output dict: logits from the T1 mean, region weights from 2x2x2 pooling."""

    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.tensor([0.0, 1.0, 2.0]))
        self.seen_fmri: list[bool] = []

    def forward(self, t1=None, fmri=None):
        self.seen_fmri.append(fmri is not None)
        m = t1.mean(dim=(1, 2, 3, 4))
        logits = -(m[:, None] - self.centres) ** 2 * 10
        rw = torch.nn.functional.avg_pool3d(t1.abs(), 2).flatten(1)
        return {"logits": logits, "region_weights": rw / rw.sum(1, keepdim=True)}


def test_predict_collects_outputs_and_restores_mode():
    ds = ToyCohort(7, fmri=False)
    model = ToyModel().train()
    preds = predict(model, DataLoader(ds, batch_size=3), "cpu", class_names=CLASSES)
    assert model.training, "predict must restore train mode"
    assert model.seen_fmri and not any(model.seen_fmri), "absent fMRI must reach the model as None"
    assert preds.subjects == ds.subjects
    assert preds.labels.tolist() == ds.labels
    assert preds.probs.shape == (7, 3) and preds.probs.dtype == np.float32
    np.testing.assert_allclose(preds.probs.sum(1), 1, atol=1e-6)
    assert preds.preds.tolist() == ds.labels  # toy model is right by construction
    assert preds.region_weights.shape == (7, GRID)


def test_predict_under_bf16_autocast_matches_fp32():
    ds = ToyCohort(5)
    model = ToyModel()
    fp32 = predict(model, DataLoader(ds, batch_size=2), "cpu")
    bf16 = predict(model, DataLoader(ds, batch_size=2), "cpu", autocast_dtype=torch.bfloat16)
    assert model.seen_fmri[-1]
    assert (fp32.preds == bf16.preds).all()
    np.testing.assert_allclose(fp32.probs, bf16.probs, atol=0.05)


def test_predict_checks_class_count():
    with pytest.raises(PredictionsError, match="num_classes=2"):
        predict(ToyModel(), DataLoader(ToyCohort(3), batch_size=3), "cpu", class_names=["NC", "AD"])


def test_write_and_load_predictions_round_trip(tmp_path):
    ds = ToyCohort(9)
    preds = predict(ToyModel(), DataLoader(ds, batch_size=4), "cpu")
    train = predict(ToyModel(), DataLoader(ToyCohort(4), batch_size=4), "cpu")
    metrics = write_predictions(preds, tmp_path, CLASSES, "AD", extra={"train": train})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics and on_disk["split"] == "test" and on_disk["accuracy"] == 1.0
    assert on_disk["by_split"]["train"]["n"] == 4
    header = (tmp_path / "predictions.csv").read_text().splitlines()[0]
    assert header == "subject,split,label,pred,prob_NC,prob_MCI,prob_AD"
    back, names = load_predictions(tmp_path)
    assert names == CLASSES and back.subjects == preds.subjects
    assert (back.labels == preds.labels).all() and (back.preds == preds.preds).all()
    np.testing.assert_allclose(back.probs, preds.probs, atol=1e-5)
    np.testing.assert_array_equal(back.region_weights, preds.region_weights)
    back_train, _ = load_predictions(tmp_path, "train")
    assert len(back_train) == 4 and back_train.region_weights.shape == (4, 0)


def test_epoch_metrics_are_flat_floats():
    preds = predict(ToyModel(), DataLoader(ToyCohort(6), batch_size=6), "cpu")
    scalars = flat_scalars(prediction_metrics(preds, CLASSES, "AD"))
    assert scalars["accuracy"] == 1.0 and scalars["recall"] == 1.0 and "precision/MCI" in scalars


def test_load_predictions_refuses_mismatched_region_weights(tmp_path):
    preds = predict(ToyModel(), DataLoader(ToyCohort(6), batch_size=6), "cpu")
    write_predictions(preds, tmp_path, CLASSES, "AD")
    np.save(tmp_path / "region_weights.npy", np.zeros((2, GRID), np.float32))
    with pytest.raises(PredictionsError, match="different runs"):
        load_predictions(tmp_path)


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ds = ToyCohort(5)  # 5 subjects on 2 ranks: the sampler pads rank 1 with a repeat
        loader = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, world, rank, shuffle=False))
        local = predict(ToyModel(), loader, "cpu")
        merged = gather_predictions(local)
        np.savez(f"{out}{rank}.npz", subjects=np.array(merged.subjects), probs=merged.probs,
                 local=np.array(local.subjects))
    finally:
        dist.destroy_process_group()


def test_gather_predictions_over_two_gloo_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "rank")), nprocs=2)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    assert len(r0["local"]) == 3 and len(r1["local"]) == 3  # padded shares
    expected = [f"sub-{i:02d}" for i in range(5)]
    assert r0["subjects"].tolist() == expected == r1["subjects"].tolist()
    np.testing.assert_array_equal(r0["probs"], r1["probs"])


def test_predictions_are_a_plain_dataclass():
    p = Predictions(["a"], np.zeros(1, np.int64), np.array([[0.2, 0.8]], np.float32), np.zeros((1, 0), np.float32))
    assert len(p) == 1 and p.preds.tolist() == [1]


def test_expected_stage_calls_the_stage_between_split_neighbours():
    """NC < EMCI < LMCI < AD: probability split between two stages calls the stage between them,
    where arg-max calls the larger side by a hair and never the middle stages."""
    probs = np.array([[0.40, 0.05, 0.15, 0.40],   # torn between NC and AD: expected stage 1.5 -> LMCI
                      [0.51, 0.00, 0.00, 0.49],   # arg-max NC, expected stage 1.47 -> EMCI
                      [0.00, 0.30, 0.00, 0.70],   # expected 2.4 -> LMCI
                      [0.90, 0.10, 0.00, 0.00],
                      [0.00, 0.00, 0.10, 0.90]])
    assert decide(probs, "argmax").tolist() == [0, 0, 3, 0, 3]
    assert decide(probs, "expected_stage").tolist() == [2, 1, 2, 0, 3]
    two = np.array([[0.7, 0.3], [0.2, 0.8], [0.45, 0.55]])
    assert (decide(two, "expected_stage") == decide(two, "argmax")).all()  # two classes: the same call
    with pytest.raises(PredictionsError, match="data.decision"):
        decide(probs, "median")


def test_the_decision_rule_travels_with_the_predictions(tmp_path):
    """A run that calls by expected stage writes its rule into metrics.json; reading the run back
    calls the same classes, and a run written before the rule existed reads as arg-max."""
    probs = np.array([[0.5, 0.1, 0.4], [0.1, 0.8, 0.1], [0.2, 0.0, 0.8]], np.float32)
    preds = Predictions(["a", "b", "c"], np.array([1, 1, 2]), probs, np.zeros((3, 0), np.float32), "expected_stage")
    metrics = write_predictions(preds, tmp_path, CLASSES, "AD")
    assert metrics["decision"] == "expected_stage" and metrics["accuracy"] == 1.0  # arg-max: 2 of 3
    back, _ = load_predictions(tmp_path)
    assert back.decision == "expected_stage" and back.preds.tolist() == [1, 1, 2]
    assert merge_predictions([back]).decision == "expected_stage"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    del on_disk["decision"]
    (tmp_path / "metrics.json").write_text(json.dumps(on_disk))
    assert load_predictions(tmp_path)[0].preds.tolist() == [0, 1, 2]
    for damaged in ("null", '{"n": 3', "\xff"):  # named as damaged, never a TypeError or a traceback
        (tmp_path / "metrics.json").write_text(damaged, encoding="latin-1")
        with pytest.raises(PredictionsError, match="metrics.json is damaged"):
            load_predictions(tmp_path)


def test_label_smoothing_is_undone_on_the_reported_probabilities():
    """A head fitted to targets smoothed by eps estimates (1 - eps) p + eps / C: undone, the
    probabilities are p again, the arg-max and each class's ranking unchanged, and the expected
    stage no longer pulls a confident AD or NC call towards the middle."""
    eps, p = 0.2, np.array([[0.0, 0.0, 0.45, 0.55], [0.9, 0.1, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    q = (1 - eps) * p + eps / 4
    np.testing.assert_allclose(unsmoothed(q, eps), p, atol=1e-6)
    assert (decide(unsmoothed(q, eps), "argmax") == decide(q, "argmax")).all()
    assert decide(q, "expected_stage").tolist() == [2, 0, 2]  # 2.34: a 55 % AD call pulled to LMCI
    assert decide(unsmoothed(q, eps), "expected_stage").tolist() == [3, 0, 2]
    below = unsmoothed(np.array([[0.02, 0.08, 0.2, 0.7]]), eps)  # NC below eps / C: clipped, the rest renormalised
    assert below[0, 0] == 0 and np.isclose(below.sum(), 1) and (np.diff(below[0]) > 0).all()
    np.testing.assert_array_equal(unsmoothed(q, 0.0), q.astype(np.float32))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_predict_subjects_reports_the_probabilities_with_the_runs_smoothing_undone(smoothing):
    cfg = load_config(None, ["optim.micro_batch=2", f"loss.label_smoothing={smoothing}",
                             "data.decision=expected_stage"])
    torch.manual_seed(0)
    model, data = ToyModel(), ToyCohort(6)
    preds = predict_subjects(model, data, cfg, torch.device("cpu"), CLASSES)
    raw = predict(model, DataLoader(data, batch_size=2), torch.device("cpu"), class_names=CLASSES)
    np.testing.assert_allclose(preds.probs, unsmoothed(raw.probs, smoothing), atol=1e-6)
    assert preds.decision == "expected_stage" and np.allclose(preds.probs.sum(1), 1)
    if smoothing:  # the AUC ranks by the head's own probabilities
        np.testing.assert_allclose(preds.scores, raw.probs, atol=1e-6)
    else:
        assert preds.scores is None


def test_the_auc_of_undone_smoothing_ranks_by_the_heads_own_probabilities(tmp_path):
    """Undoing the smoothing clips a row's classes below eps / C and renormalises the row, which
    can put one subject's P(AD) above another's that the head ranked higher: the AUC, in
    metrics.json and read back from predictions.csv, is the head's ranking."""
    eps = 0.1
    q = np.array([[0.02, 0.46, 0.52], [0.2, 0.285, 0.515], [0.9, 0.05, 0.05]], np.float32)  # AD, MCI, NC
    p = unsmoothed(q, eps)
    assert q[0, 2] > q[1, 2] and p[0, 2] < p[1, 2]  # the head ranks the AD subject higher; p does not
    labels = np.array([2, 1, 0])
    preds = Predictions(["a", "b", "c"], labels, p, np.zeros((3, 0), np.float32), scores=q)
    assert write_predictions(preds, tmp_path, CLASSES, "AD")["auc"] == 1.0
    back, _ = load_predictions(tmp_path)
    np.testing.assert_allclose(back.scores, q, atol=1e-6)
    assert prediction_metrics(back, CLASSES, "AD")["auc"] == 1.0
    assert prediction_metrics(Predictions(["a", "b", "c"], labels, p, np.zeros((3, 0), np.float32)),
                              CLASSES, "AD")["auc"] == 0.5


def test_prediction_files_from_two_writes_are_refused_when_read(tmp_path):
    """The three files are put in place one after another: a kill between two renames left a
    new metrics.json beside the old predictions, equal in rows, and nothing could tell."""
    from masan.predictions import PredictionsError, load_predictions, write_predictions

    names = ["NC", "AD"]

    def preds(p_ad: float) -> Predictions:
        return Predictions(["s1", "s2"], np.array([0, 1]), np.array([[1 - p_ad, p_ad], [0.2, 0.8]], np.float32),
                           np.zeros((2, 8), np.float32))

    write_predictions(preds(0.3), tmp_path, names, "AD")
    old = (tmp_path / "predictions.csv").read_bytes()
    write_predictions(preds(0.6), tmp_path, names, "AD")
    assert load_predictions(tmp_path)[0].probs[0, 1] == pytest.approx(0.6)
    (tmp_path / "predictions.csv").write_bytes(old)  # as if the write stopped after metrics.json's rename
    with pytest.raises(PredictionsError, match="is not the file metrics.json was written with"):
        load_predictions(tmp_path)


def test_a_killed_writes_hidden_temporaries_are_removed_by_the_next_write(tmp_path):
    """A write killed before its renames left hidden temporary files that no run removed; another
    host's, or a live writer's, are not this write's to judge."""
    import socket

    host = socket.gethostname()
    from masan.evaluate.report_folder import ReportFolder
    from masan.predictions import write_predictions

    gone = subprocess.Popen(["true"])  # a writer that has ended
    gone.wait()
    for folder in (tmp_path / "pred", tmp_path / "rep" / "figures"):
        folder.mkdir(parents=True)
        (folder / f".predictions.csv.{gone.pid}@{host}.0123abcd.tmp").write_text("half")
        (folder / f".metrics.json.{os.getpid()}@{host}.0123abcd.tmp").write_text("a live writer's")
        (folder / f".metrics.json.{gone.pid}@othernode.0123abcd.tmp").write_text("another node's")
    preds = Predictions(["s1", "s2"], np.array([0, 1]), np.array([[0.7, 0.3], [0.2, 0.8]], np.float32),
                        np.zeros((2, 8), np.float32))
    write_predictions(preds, tmp_path / "pred", ["NC", "AD"], "AD")
    ReportFolder(tmp_path / "rep").begin()
    for folder in (tmp_path / "pred", tmp_path / "rep" / "figures"):
        left = {p.name for p in folder.glob(".*.tmp")}
        assert left == {f".metrics.json.{gone.pid}@othernode.0123abcd.tmp",
                        f".metrics.json.{os.getpid()}@{host}.0123abcd.tmp"}, left
