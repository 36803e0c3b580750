"""The fMRI connectivity features (model.connectivity_cells) and the class-weighted
cross-entropy (loss.class_weights): what a hard, imbalanced cohort needs from the head."""

import dataclasses

import numpy as np
import pytest
import torch

from masan.config import ConfigError, LossConfig, load_config
from masan.model import build_model, masan_loss, small_model_config
from masan.model.connectivity import PairConnectivity, cell_time_courses, correlations, pair_cells
from masan.model.loss import class_weights


def test_cell_time_courses_are_the_cells_means_in_region_order():
    torch.manual_seed(0)
    fmri = torch.randn(2, 5, 8, 8, 4, dtype=torch.float64)
    series = cell_time_courses(fmri, (2, 2, 1), 2)  # 4 regions x 8 cells
    assert series.shape == (2, 32, 5)
    # region 1 (gx 0, gy 1, gz 0) spans x 0:4, y 4:8, z 0:4; its cell 3 (0, 1, 1) is x 0:2, y 6:8, z 2:4
    want = fmri[:, :, 0:2, 6:8, 2:4].mean(dim=(2, 3, 4))
    torch.testing.assert_close(series[:, 1 * 8 + 3], want)


def test_correlations_match_numpy_and_a_constant_row_is_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 40))
    x[0, 5] = 3.0  # constant: background
    got = correlations(torch.from_numpy(x))[0].numpy()
    want = np.corrcoef(x[0, :5])
    np.testing.assert_allclose(got[:5, :5], want, atol=1e-10)
    assert np.all(got[5] == 0) and np.all(got[:, 5] == 0)


@pytest.mark.parametrize("n", [2, 3, 8, 97, 2000])
def test_pair_cells_inverts_the_upper_triangle_order(n):
    want = torch.triu_indices(n, n, offset=1)
    i, j = pair_cells(torch.arange(want.shape[1]), n)
    assert torch.equal(i, want[0]) and torch.equal(j, want[1])


def _coupled_subjects(n: int, coupled: bool, g: torch.Generator) -> torch.Tensor:
    """``n`` subjects ``(n, 64, 4, 4, 4)``: regions 0 and 7 (far corners of a 2x2x2 grid) share
    a signal when ``coupled``; everything else is independent noise."""
    t = 64
    out = []
    for _ in range(n):
        shared = torch.randn(t, generator=g, dtype=torch.float64)
        x = torch.randn(1, t, 4, 4, 4, generator=g, dtype=torch.float64) * 0.3
        x[0, :, :2, :2, :2] += shared[:, None, None, None]  # region 0
        other = shared if coupled else torch.randn(t, generator=g, dtype=torch.float64)
        x[0, :, 2:, 2:, 2:] += other[:, None, None, None]  # region 7, the far corner
        out.append(x)
    return torch.cat(out)


def test_connectivity_screening_keeps_the_pair_whose_coupling_differs():
    """Two classes that differ only in whether two distant regions fluctuate together: the
    fitted screening keeps that pair, its feature separates the classes, and a scaled copy of
    the input gives the same features (correlations)."""
    g = torch.Generator().manual_seed(1)
    conn = PairConnectivity((2, 2, 2), 1, keep=1, num_classes=2, std_floor=0.1).double()
    coupled, uncoupled = _coupled_subjects(6, True, g), _coupled_subjects(6, False, g)
    conn.screen.begin_fit()
    for x, label in ((coupled, 1), (uncoupled, 0)):
        conn.screen.set_labels(torch.full((x.shape[0],), label))
        conn(x)
    conn.screen.end_fit()
    assert [int(c) for c in pair_cells(conn.screen.kept, conn.num_cells)] == [0, 7]
    # the model keeps the chosen pair's statistics only, not the candidates'
    assert {k: tuple(v.shape) for k, v in conn.state_dict().items()} == {
        "screen.kept": (1,), "screen.mean": (1,), "screen.std": (1,), "screen.fitted_samples": ()}
    a, b = conn(coupled), conn(uncoupled)
    assert a.shape == (6, 1) and a.min() > b.max()
    torch.testing.assert_close(conn(coupled * 40.0 + 7.0), a)


def test_connectivity_needs_a_pair_count():
    with pytest.raises(ValueError, match="connectivity_keep"):
        PairConnectivity((2, 2, 2), 1, keep=29, num_classes=2, std_floor=0.1)  # 8 cells have 28 pairs
    with pytest.raises(ConfigError, match="connectivity_keep"):
        load_config(None, ["model.connectivity_cells=2"])


def test_model_with_connectivity_trains_and_the_pairs_reach_the_classifier():
    cfg = dataclasses.replace(small_model_config(), connectivity_cells=2, connectivity_keep=5)
    model = build_model(cfg, 4)
    conn = model.connectivity
    assert conn is not None and conn.keep == 5
    t1 = torch.randn(2, 1, *cfg.t1_shape)
    fmri = torch.randn(2, cfg.fmri_frames, *cfg.fmri_shape)
    out = model(t1=t1, fmri=fmri)
    masan_loss(out, {"t1": t1, "fmri": fmri, "label": torch.tensor([0, 3])}, LossConfig())["total"].backward()
    assert model.attention.query.weight.grad is not None
    regions = int(np.prod(cfg.patch_grid))
    weight = model.classifier.net[0].weight  # (hidden, regions * value_dim + pairs)
    assert weight.shape[1] == regions * cfg.value_dim + 5 and weight.grad[:, -5:].abs().sum() > 0
    model.eval()  # occlusion (the default region weights) with the pairs beside the regions
    weights = model(t1=t1, fmri=fmri)["region_weights"]
    assert weights.shape == (2, regions) and torch.allclose(weights.sum(1), torch.ones(2))
    t1_only = build_model(dataclasses.replace(cfg, modalities="t1"), 4)
    assert t1_only.connectivity is None  # no fMRI, no connectivity


def test_balanced_class_weights_equalise_the_classes():
    w = class_weights([0] * 6 + [1] * 2 + [3] * 4, 4, "balanced")
    torch.testing.assert_close(w, torch.tensor([12 / 18, 12 / 6, 0.0, 12 / 12]))
    counts = torch.tensor([6.0, 2.0, 0.0, 4.0])
    assert torch.allclose(w * counts, torch.tensor([4.0, 4.0, 0.0, 4.0]))  # every present class weighs alike
    assert class_weights([0, 1], 2, "none") is None
    with pytest.raises(ValueError, match="class_weights"):
        class_weights([0, 1], 2, "inverse")


def test_weighted_cross_entropy_counts_a_rare_class_more():
    logits = torch.zeros(3, 2, requires_grad=True)
    out = {"logits": logits}
    batch = {"label": torch.tensor([0, 0, 1])}
    weight = class_weights([0, 0, 0, 0, 1], 2, "balanced")
    masan_loss(out, batch, LossConfig(), class_weight=weight)["ce"].backward()
    g = logits.grad
    # weights 5/8 and 5/2: a class-1 subject pulls 4 times as hard as a class-0 one
    assert torch.isclose(g[2, 1] / g[0, 0], torch.tensor(4.0), rtol=1e-5)


def test_class_weights_act_the_same_whatever_the_micro_batch():
    """A micro-batch of one subject (paper.yaml's) is weighted like the whole batch: the mean of
    the micro-batches' losses, as gradient accumulation and the ranks average them, is the whole
    batch's loss (a weighted mean over the batch's weight sum cancelled a lone subject's weight)."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 2, 2])
    weight = class_weights(labels.tolist(), 3, "balanced")
    cfg = LossConfig(label_smoothing=0.1)

    def ce(rows) -> torch.Tensor:
        return masan_loss({"logits": logits[rows]}, {"label": labels[rows]}, cfg, class_weight=weight)["ce"]

    whole = ce(slice(None))
    for size in (1, 2, 3):
        parts = [ce(slice(i, i + size)) for i in range(0, 6, size)]
        torch.testing.assert_close(torch.stack(parts).mean(), whole)
    assert not torch.isclose(ce(slice(3, 4)), masan_loss({"logits": logits[3:4]}, {"label": labels[3:4]}, cfg)["ce"])


def test_screen_fraction_keeps_a_fraction_and_excludes_the_count():
    cfg = dataclasses.replace(small_model_config(), screen_fraction=0.01)
    model = build_model(cfg, 4)
    total = model.attention.norm.mean.numel()
    assert model.attention.norm.keep == max(1, round(0.01 * total))
    with pytest.raises(ConfigError, match="give one of them"):
        load_config(None, ["model.screen_features=20", "model.screen_fraction=0.001"])
    with pytest.raises(ConfigError, match="screen_fraction"):
        load_config(None, ["model.screen_fraction=1.5"])
