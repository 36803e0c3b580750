"""Patch grid helpers and the locality of the patch-level modules."""

import numpy as np
import pytest
import torch

from masan.model import build_model, small_model_config
from masan.model.regions import (
    merge_patches,
    pool_volume,
    region_features,
    region_slices,
    regions_to_voxels,
    split_patches,
)

GRID = (2, 3, 2)


def test_split_then_merge_is_the_identity_and_follows_region_slices():
    x = torch.randn(2, 3, 8, 9, 6)
    patches = split_patches(x, GRID)
    assert patches.shape == (2 * 12, 3, 4, 3, 3)
    assert torch.equal(merge_patches(patches, GRID), x)
    for index in (0, 5, 11):
        assert torch.equal(patches[12 + index], x[1][(slice(None), *region_slices((8, 9, 6), GRID, index))])


def test_regions_to_voxels_paints_each_region_on_its_voxels():
    weights = np.arange(12, dtype=float)
    painted = regions_to_voxels(weights, GRID, (8, 9, 6))
    assert painted.shape == (8, 9, 6)
    for index in range(12):
        assert np.all(painted[region_slices((8, 9, 6), GRID, index)] == index)
    batched = regions_to_voxels(np.stack([weights, -weights]), GRID, (8, 9, 6))
    assert batched.shape == (2, 8, 9, 6) and np.array_equal(batched[1], -painted)


def test_pool_volume_regions_match_split_patches_when_sizes_divide():
    # fp64: adaptive pooling and mean sum in different orders, and an fp32 mean near 0 can
    # differ by more than allclose's absolute tolerance (seen on one CPU's kernels)
    x = torch.randn(1, 2, 8, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pooled = region_features(pool_volume(x, GRID, 1, ["avg", "max"]), GRID)  # (1, 12, 4)
    patches = split_patches(x, GRID)
    assert torch.allclose(pooled[0, :, :2], patches.mean(dim=(2, 3, 4)))
    assert torch.allclose(pooled[0, :, 2:], patches.amax(dim=(2, 3, 4)))


def test_unknown_pool_mode_is_an_error():
    with pytest.raises(ValueError, match="region_pool"):
        pool_volume(torch.randn(1, 1, 4, 4, 4), (2, 2, 2), 1, ["median"])


@pytest.mark.parametrize("modality", ["t1", "fmri"])
def test_change_in_one_region_stays_in_that_region(modality):
    cfg = small_model_config(fmri_layout="patches")
    model = build_model(cfg, 2).eval()
    torch.manual_seed(1)
    inputs = {"t1": torch.randn(1, 1, 32, 32, 32), "fmri": torch.randn(1, 6, 16, 16, 16)}
    changed = {k: v.clone() for k, v in inputs.items()}
    region = 5
    where = region_slices(inputs[modality].shape[2:], cfg.patch_grid, region)
    changed[modality][(slice(None), slice(None), *where)] += 3.0
    with torch.no_grad():
        before, after = model(**inputs), model(**changed)
    recon_diff = (after[f"{modality}_recon"] - before[f"{modality}_recon"]).abs()
    inside = torch.zeros_like(recon_diff, dtype=torch.bool)
    inside[(slice(None), slice(None), *where)] = True
    assert recon_diff[inside].max() > 1e-4
    assert recon_diff[~inside].max() == 0
    code_diff = (after[f"{modality}_code"] - before[f"{modality}_code"]).flatten(2).abs().amax(dim=2)[0]
    assert code_diff[region] > 0
    assert torch.all(code_diff[torch.arange(8) != region] == 0)
