"""Output contract of build_model (docs/architecture.md, section Model) for every configuration."""

import dataclasses

import pytest
import torch

from masan.model import build_model, small_model_config

T1 = (32, 32, 32)
FMRI = (6, 16, 16, 16)
CONFIGS = {
    "attention": {},
    "add": {"fusion": "add"},
    "t1_only": {"modalities": "t1"},
    "fmri_only": {"modalities": "fmri"},
    "temporal_conv": {"fmri_time": "temporal_conv"},
    "fmri_patches": {"fmri_layout": "patches"},
    "fusion_cells_2": {"fusion_cells": 2},
    "embedding_weights": {"region_weights": "embedding"},
    "avg_pool_only": {"region_pool": ["avg"]},
    "chunked_patches": {"patch_chunk": 3},
    "channels_last": {"channels_last": True},
    "fmri_widths_differ": {"fmri_channels": [4, 8, 16, 8]},
    "three_levels": {"channels": [4, 8, 8], "fmri_channels": [4, 8, 8]},
    "ordinal_head": {"head": "ordinal"},
}
RECON_KEYS = {"t1": {"t1_recon", "t1_code"}, "fmri": {"fmri_recon", "fmri_code"}}


def _inputs(batch=2, t1=T1, fmri=FMRI):
    torch.manual_seed(0)
    return torch.randn(batch, 1, *t1), torch.randn(batch, *fmri)


def _check_region_outputs(out, batch, regions):
    weights = out["region_weights"]
    assert weights.shape == (batch, regions)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones(batch), atol=1e-5)


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_masan_outputs_have_contract_shapes(name, classes):
    cfg = small_model_config(**CONFIGS[name])
    t1, fmri = _inputs()
    out = build_model(cfg, classes).eval()(t1=t1, fmri=fmri)
    used = {"both": ("t1", "fmri"), "t1": ("t1",), "fmri": ("fmri",)}[cfg.modalities]
    expected = {"logits", "region_weights", "attention"}.union(*(RECON_KEYS[m] for m in used))
    assert set(out) == expected
    assert out["logits"].shape == (2, classes)
    if "t1" in used:
        assert out["t1_recon"].shape == t1.shape
        assert out["t1_code"].shape[:2] == (2, 8)  # one code per patch
    if "fmri" in used:
        assert out["fmri_recon"].shape == fmri.shape
    _check_region_outputs(out, 2, 8)
    attention = out["attention"]
    assert attention.shape == (2, 8, 8)
    assert (attention >= 0).all()
    assert torch.allclose(attention.sum(dim=-1), torch.ones(2, 8), atol=1e-5)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_odd_patch_sizes_reconstruct_to_the_input_shape():
    # 30x32x22 in 2x2x2 patches: 15x16x11 -> 8x8x6 -> 4x4x3 -> 2x2x2, as the paper's 60 -> 30 -> 15 -> 8
    cfg = small_model_config(t1_shape=[30, 32, 22], fmri_shape=[15, 16, 11])
    t1, fmri = _inputs(1, (30, 32, 22), (6, 15, 16, 11))
    out = build_model(cfg, 4)(t1=t1, fmri=fmri)
    assert out["t1_recon"].shape == t1.shape and out["fmri_recon"].shape == fmri.shape
    assert out["t1_code"].shape == (1, 8, 8, 2, 2, 2)


@pytest.mark.parametrize("classes", [2, 4])
def test_hfcn_outputs_logits_and_region_weights(classes):
    t1, fmri = _inputs()
    out = build_model(small_model_config(arch="hfcn"), classes)(t1=t1, fmri=fmri)
    assert set(out) == {"logits", "region_weights", "t1_recon", "t1_code"}  # no fMRI: T1 only
    assert out["logits"].shape == (2, classes) and out["t1_recon"].shape == t1.shape
    _check_region_outputs(out, 2, 8)


def test_hfcn_groups_patches_into_regions():
    cfg = small_model_config(arch="hfcn", patch_grid=[4, 4, 4], hfcn_region_group=2)
    out = build_model(cfg, 3)(t1=torch.randn(1, 1, 32, 32, 32))
    _check_region_outputs(out, 1, 64)


def test_hfcn_takes_masans_region_options():
    """The patch features H-FCN standardises are MASAN's T1 region features: every level, the
    fusion cells, the same screening (a fair baseline differs from MASAN in its head only)."""
    cfg = small_model_config(arch="hfcn", fusion_cells=2, screen_features=5)
    hfcn, masan = build_model(cfg, 2), build_model(dataclasses.replace(cfg, arch="masan", modalities="t1"), 2)
    assert hfcn.norm.mean.shape == masan.attention.norm.mean.shape == (8, 2 * (4 + 8 + 8 + 8) * 2**3)
    assert hfcn.norm.keep == masan.attention.norm.keep == 5


def test_missing_modality_input_names_the_fix():
    t1, _ = _inputs()
    with pytest.raises(ValueError, match="no fmri.*data.use_fmri"):
        build_model(small_model_config(), 2)(t1=t1)


def test_frame_count_mismatch_names_the_fix():
    t1, fmri = _inputs()
    with pytest.raises(ValueError, match="5 frames.*model.fmri_frames=6"):
        build_model(small_model_config(), 2)(t1=t1, fmri=fmri[:, :5])


def test_volume_not_divisible_by_grid_names_the_fix():
    with pytest.raises(ValueError, match="patch grid.*model.patch_grid"):
        build_model(small_model_config(modalities="t1"), 2)(t1=torch.randn(1, 1, 31, 32, 32))


def test_groupnorm_groups_must_divide_widths():
    with pytest.raises(ValueError, match="model.groups"):
        build_model(small_model_config(groups=3), 2)
