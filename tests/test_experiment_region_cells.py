"""The region-cells proxy (experiments/region_cells.py): the model's features at other cell counts,
and a cross-validated score that finds a planted feature."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from experiments.region_cells import pretraining_end, proxy_scores, region_feature_rows
from masan.model import build_model, small_model_config
from masan.model.regions import num_regions
from masan.rundir import RunDir
from masan.train.checkpoint import MARKER


def test_region_features_at_other_cells_are_what_the_model_would_pool():
    cfg = small_model_config()
    model = build_model(cfg, 4).eval()
    samples = [{"t1": torch.randn(1, 1, *cfg.t1_shape), "fmri": torch.randn(1, cfg.fmri_frames, *cfg.fmri_shape)}
               for _ in range(2)]
    width = sum(2 * c for c in cfg.channels)  # avg + max per level
    own_cells = model.spm.cells
    for cells in (1, 2):
        rows = region_feature_rows(model, samples, cells)
        assert rows.shape == (2, num_regions(cfg.patch_grid) * width * cells**3)
        assert model.spm.cells == model.fpm.spatial.cells == own_cells  # the model is handed back as it came
    # at the model's own cell count: exactly the regions its forward pass standardises
    built = build_model(dataclasses.replace(cfg, fusion_cells=2), 4).eval()
    built.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith(("attention", "classifier"))}, strict=False)
    with torch.no_grad():
        own = built.region_inputs(samples[0]["t1"], samples[0]["fmri"]).flatten()
    assert np.allclose(region_feature_rows(model, samples[:1], 2)[0], own.numpy(), atol=1e-5)


def test_proxy_scores_find_a_planted_feature_and_keep_counts_matter():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 15)
    features = rng.normal(size=(60, 400))
    features[np.arange(60), 7 + labels] += 3.0  # four informative features among 400, one per class
    scores = proxy_scores(features, labels, [4, 400], positive=3)
    assert set(scores) == {4, 400}
    assert scores[4][0] > 0.8 and scores[4][1] > 0.9  # screening finds them
    assert scores[4][0] > scores[400][0] + 0.1  # keeping every feature drowns them


def test_the_default_checkpoint_is_the_last_complete_one_of_pretraining(tmp_path):
    def checkpoint(tag, phase, complete=True):
        folder = RunDir(tmp_path).checkpoints / tag
        folder.mkdir(parents=True)
        if complete:
            (folder / MARKER).write_text(json.dumps({"files": {}, "state": {"phase": phase}}))

    checkpoint("step_000010", "pretrain")
    with pytest.raises(ValueError, match="--checkpoint"):
        pretraining_end(tmp_path / "no-run")
    checkpoint("step_000020", "pretrain")
    checkpoint("step_000025", "pretrain", complete=False)  # an interrupted save is never the answer
    checkpoint("step_000090", "joint")
    assert pretraining_end(tmp_path) == "step_000020"
