"""The fitted cohort standardiser: exact statistics, fp32 under bf16 engines, the same on every
rank (real gloo processes), in the checkpointed state, and region importance by occlusion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from masan.model import build_model, small_model_config
from masan.model.standardize import FittedStandardize, standardizers
from masan.train.standardize import fit_standardizers


class _Probe(nn.Module):
    """The smallest model with a standardiser: t1 (B, 1, 2, 3, 1) -> standardised (B, 6)."""

    def __init__(self, keep: int = 0):
        super().__init__()
        self.norm = FittedStandardize((6,), std_floor=0.0, keep=keep, num_classes=3)

    def forward(self, t1=None, fmri=None):
        return self.norm(t1.flatten(1))


def _items(n: int = 13) -> list[dict]:
    """Subjects of 3 classes (i % 3); features 1 and 4 shift with the class, feature 4 most."""
    g = torch.Generator().manual_seed(3)
    offset = torch.arange(6.0).reshape(1, 2, 3, 1) * 100  # a large shared offset, small spread
    shift = torch.tensor([0.0, 2.0, 0.0, 0.0, 6.0, 0.0]).reshape(1, 2, 3, 1)
    return [{"t1": offset + torch.randn(1, 2, 3, 1, generator=g) * (1 + i % 3) + shift * (i % 3),
             "label": torch.tensor(i % 3)} for i in range(n)]


def test_fit_gives_the_cohort_mean_and_std_and_freezes_them():
    items = _items()
    probe = _Probe()
    assert torch.equal(probe(**{"t1": items[0]["t1"][None]}), items[0]["t1"].flatten()[None])  # identity before
    fit_standardizers(probe, items, rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32,
                      micro_batch=4)
    x = np.stack([it["t1"].flatten().double().numpy() for it in items])
    assert np.allclose(probe.norm.mean.numpy(), x.mean(0), rtol=1e-6)
    assert np.allclose(probe.norm.std.numpy(), x.std(0, ddof=1), rtol=1e-5)
    assert int(probe.norm.fitted_samples) == len(items)
    before = probe.norm.mean.clone()
    probe.train()
    probe(t1=torch.stack([it["t1"] for it in items]) + 1000)  # training forwards never move the statistics
    assert torch.equal(probe.norm.mean, before)
    z = probe(t1=torch.stack([it["t1"] for it in items])).double()
    assert torch.allclose(z.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)


def test_statistics_stay_fp32_when_the_model_is_cast_to_bf16():
    probe = _Probe(keep=2)
    fit_standardizers(probe, _items(), 0, 1, torch.device("cpu"), torch.float32, 2)
    mean, mask = probe.norm.mean.clone(), probe.norm.keep_mask.clone()
    probe.to(torch.bfloat16)
    assert probe.norm.mean.dtype == torch.float32 and torch.equal(probe.norm.mean, mean)
    assert torch.equal(probe.norm.keep_mask, mask)
    assert {"norm.mean", "norm.std", "norm.keep_mask"} <= set(probe.state_dict())  # travels in checkpoints


def test_screening_keeps_the_features_that_separate_the_classes():
    items = _items(30)
    probe = _Probe(keep=2)
    fit_standardizers(probe, items, 0, 1, torch.device("cpu"), torch.float32, 4)
    assert probe.norm.keep_mask.tolist() == [0, 1, 0, 0, 1, 0]
    z = probe(t1=torch.stack([it["t1"] for it in items]))
    assert torch.all(z[:, [0, 2, 3, 5]] == 0)  # screened out: the cohort mean for every subject
    assert torch.all(z[:, [1, 4]].std(0) > 0.5)
    with pytest.raises(RuntimeError, match="set_labels"):  # a fit without classes cannot screen
        fit_standardizers(probe, [{"t1": it["t1"]} for it in items], 0, 1, torch.device("cpu"), torch.float32, 4)


def test_a_refit_keeps_the_first_screening_unless_asked_to_rescreen():
    items = _items(30)
    probe = _Probe(keep=2)
    fit_standardizers(probe, items, 0, 1, torch.device("cpu"), torch.float32, 4)
    assert probe.norm.keep_mask.tolist() == [0, 1, 0, 0, 1, 0]
    # the features drift during training: now features 0 and 2 separate the classes instead
    drift = torch.tensor([6.0, -2.0, 6.0, 0.0, -6.0, 0.0]).reshape(1, 2, 3, 1)
    drifted = [{"t1": it["t1"] + drift * int(it["label"]) + 7.0, "label": it["label"]} for it in items]
    fit_standardizers(probe, drifted, 0, 1, torch.device("cpu"), torch.float32, 4, rescreen=False)
    assert probe.norm.keep_mask.tolist() == [0, 1, 0, 0, 1, 0]  # the head keeps its features ...
    expected = torch.stack([it["t1"].flatten() for it in drifted]).double()
    assert torch.allclose(probe.norm.mean.double(), expected.mean(0), rtol=1e-5)  # ... re-centred
    fit_standardizers(probe, drifted, 0, 1, torch.device("cpu"), torch.float32, 4, rescreen=True)
    assert probe.norm.keep_mask.tolist() == [1, 0, 1, 0, 0, 0]


def test_std_floor_bounds_the_amplification_of_a_constant_feature():
    norm = FittedStandardize((3,), std_floor=0.1)
    norm.begin_fit()
    norm(torch.tensor([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [4.0, 5.0, 5.0]]))
    norm.end_fit()
    assert float(norm.std[1]) == pytest.approx(0.1 * 2.0)  # 10 % of the median std (2), not ~0


def _fit_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    probe = _Probe(keep=1)
    fit_standardizers(probe, _items(), rank, world, torch.device("cpu"), torch.float32, micro_batch=2)
    torch.save({"mean": probe.norm.mean, "std": probe.norm.std, "n": probe.norm.fitted_samples,
                "mask": probe.norm.keep_mask}, f"{out}{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_fit_the_same_statistics_as_one(tmp_path):
    one = _Probe(keep=1)
    fit_standardizers(one, _items(), 0, 1, torch.device("cpu"), torch.float32, 2)
    mp.spawn(_fit_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path / "rank")), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert int(got["n"]) == 13  # every subject once over both ranks: no padding, no duplicates
        assert torch.allclose(got["mean"], one.norm.mean, rtol=1e-6)
        assert torch.allclose(got["std"], one.norm.std, rtol=1e-6)
        assert torch.equal(got["mask"], one.norm.keep_mask) and int(got["mask"].sum()) == 1


@pytest.mark.parametrize("arch", ["masan", "hfcn"])
def test_both_models_have_a_standardiser(arch):
    model = build_model(small_model_config(arch=arch), 2)
    assert len(list(standardizers(model))) == 1


def test_occlusion_region_weights_measure_what_decides():
    torch.manual_seed(0)
    model = build_model(small_model_config(region_weights="occlusion"), 2).eval()
    t1, fmri = torch.randn(3, 1, 32, 32, 32), torch.randn(3, 6, 16, 16, 16)
    with torch.no_grad():
        w = model(t1=t1, fmri=fmri)["region_weights"]
    assert w.shape == (3, 8) and torch.all(w >= 0) and torch.allclose(w.sum(1), torch.ones(3))
    # a region whose standardised features sit at the cohort mean (0) for these subjects carries nothing
    norm = model.attention.norm
    with torch.no_grad():
        regions = torch.cat([m for m in model._fuse(model.spm(t1), model.fpm(fmri))], dim=1)
    from masan.model.regions import region_features
    feats = region_features(regions, model.grid)
    norm.begin_fit()
    norm(feats)
    norm.end_fit()
    norm.mean[5] = feats[:, 5].float().mean(0)  # region 5 of every subject at the mean ...
    norm.std[5] = 1e6  # ... and flat: standardised to ~0
    with torch.no_grad():
        w = model(t1=t1, fmri=fmri)["region_weights"]
    assert torch.all(w[:, 5] < 1e-4) and torch.allclose(w.sum(1), torch.ones(3))


class _ModeProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = FittedStandardize((6,), std_floor=0.0, num_classes=3)
        self.seen: list[bool] = []

    def forward(self, t1=None, fmri=None):
        self.seen.append(self.training)
        if torch.isnan(t1).any():
            raise ValueError("a bad subject")
        return self.norm(t1.flatten(1))


def _mode_items(n=6, bad=None):
    g = torch.Generator().manual_seed(0)
    return [{"t1": torch.full((1, 2, 3, 1), float("nan")) if i == bad else torch.randn(1, 2, 3, 1, generator=g),
             "label": torch.tensor(i % 3)} for i in range(n)]


@pytest.mark.parametrize("training", [True, False])
def test_the_fit_runs_in_eval_mode_and_restores_the_mode(training):
    probe = _ModeProbe().train(training)
    fit_standardizers(probe, _mode_items(), 0, 1, torch.device("cpu"), torch.float32, 2)
    assert probe.seen and not any(probe.seen)  # no dropout noise in the statistics
    assert probe.training is training


def test_a_fit_that_fails_part_way_leaves_the_statistics_and_stops_accumulating():
    probe = _ModeProbe()
    before = probe.norm.mean.clone()
    with pytest.raises(ValueError, match="a bad subject"):
        fit_standardizers(probe, _mode_items(bad=3), 0, 1, torch.device("cpu"), torch.float32, 2)
    assert torch.equal(probe.norm.mean, before)
    with pytest.raises(RuntimeError, match="outside begin_fit"):
        probe.norm.sums()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ours, not a library's deprecations
        probe(t1=torch.randn(2, 1, 2, 3, 1))  # an ordinary forward afterwards
