"""Region order, ranking, atlas tables and the figures (orientation, visible overlay, PNGs)."""

from __future__ import annotations

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch

from masan.evaluate.plots import _to_ras, confusion_figure, ranking_figure, region_map_figure, save_figure
from masan.evaluate.region_ranking import (
    RegionError,
    grid_names,
    load_atlas_labels,
    paint_regions,
    rank_regions,
    region_centre,
)
from masan.model.regions import split_patches

GRID = [2, 3, 2]
SHAPE = (8, 12, 6)


def test_painted_regions_follow_the_models_patch_order():
    painted = paint_regions(np.arange(12), GRID, SHAPE)
    patches = split_patches(torch.from_numpy(painted)[None, None], GRID)  # (R, 1, 4, 4, 3)
    for r in range(12):
        assert (patches[r] == r).all(), f"region {r} painted where the model's patch {r} is not"
    assert grid_names(GRID)[5] == "x0-y2-z1"
    assert region_centre(5, GRID, SHAPE) == (1, 9, 4)


def test_paint_regions_refuses_a_wrong_grid():
    with pytest.raises(RegionError, match="patch_grid"):
        paint_regions(np.arange(8), GRID, SHAPE)


def planted_weights(n=40, regions=12, planted=7, everywhere=2, seed=0):
    """Weights where AD (label 2) subjects look at ``planted`` and everyone at ``everywhere``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    w = rng.random((n, regions)) * 0.3
    w[:, everywhere] += 0.8
    w[y == 2, planted] += 1.0
    return w, y


def test_rank_regions_puts_the_planted_region_first():
    w, y = planted_weights()
    assert rank_regions(w, y, positive_index=2, method="difference")[0][0] == 7
    by_mean = rank_regions(w, y, positive_index=2, method="mean")
    assert by_mean[0][0] == 7 and {r for r, _ in by_mean[:2]} == {7, 2}
    overall = rank_regions(w, y)
    assert overall[0][0] == 2  # all subjects: the region everyone weighs
    scores = [s for _, s in overall]
    assert scores == sorted(scores, reverse=True) and len(overall) == 12


def test_rank_regions_errors():
    w, y = planted_weights()
    with pytest.raises(RegionError, match="positive"):
        rank_regions(w, y, method="difference")
    with pytest.raises(RegionError, match="pair"):
        rank_regions(w, y[:3])
    with pytest.raises(RegionError, match="no subject"):
        rank_regions(w, y, positive_index=5)


def test_volumes_are_shown_in_ras(tmp_path):
    vol = np.zeros((4, 5, 6), np.float32)
    vol[0] = 1.0  # voxel x=0: the subject's RIGHT in an LAS image
    las = np.diag([-2.0, 3.0, 4.0, 1.0])
    (ras,), point, zooms = _to_ras([vol], las, (0, 1, 2))
    assert ras[-1].min() == 1.0 and ras[:-1].max() == 0.0  # right side at high x
    assert point == (3, 1, 2) and zooms == (2.0, 3.0, 4.0)
    permuted = np.array([[0, 0, 4.0, 0], [2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # voxel i->A, j->S, k->R
    (ras,), point, zooms = _to_ras([vol], permuted, (0, 1, 2))
    assert ras.shape == (6, 4, 5) and point == (2, 0, 1) and zooms == (4.0, 2.0, 3.0)


def _panel_pixels(fig, path, ax_index):
    """RGB pixels of one axes of a figure saved at its own dpi (no tight cropping)."""
    fig.savefig(path, dpi=fig.dpi)
    img = mpimg.imread(path)[..., :3]
    x0, y0, x1, y1 = fig.axes[ax_index].get_window_extent().extents.round().astype(int)
    return img[img.shape[0] - y1: img.shape[0] - y0, x0:x1]


def test_region_map_png_shows_the_overlay_on_the_right_side(tmp_path):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 24, 16)], indexing="ij")
    t1 = (x**2 + y**2 + z**2 < 0.8).astype(np.float32) * 100
    w = np.zeros(8, np.float32)
    w[4] = 1.0  # x1-y0-z0: high x = the subject's right in RAS
    fig = region_map_figure(t1, w, [2, 2, 2], np.diag([1.0, 1.0, 1.5, 1.0]), views=["axial"])
    t1_panel = _panel_pixels(fig, tmp_path / "map.png", 0)
    overlay = _panel_pixels(fig, tmp_path / "map.png", 1)
    assert np.abs(t1_panel[..., 0] - t1_panel[..., 2]).max() < 0.05, "the T1 panel is gray"
    red = overlay[..., 0] > overlay[..., 2] + 0.1
    blue = overlay[..., 2] > overlay[..., 0] + 0.1
    assert red.mean() > 0.1 and blue.mean() > 0.3, "the weight overlay is visible"
    rows, cols = np.nonzero(red)
    b_rows, b_cols = np.nonzero(blue)
    assert cols.mean() > b_cols.mean(), "high-weight region on the image right (subject's right)"
    assert rows.mean() > b_rows.mean(), "and at the bottom (posterior: y0), anterior being up"


def test_ranking_and_confusion_figures(tmp_path):
    w, y = planted_weights()
    fig = ranking_figure(w, y, ["NC", "MCI", "AD"], grid_names(GRID), 2, "difference", top_k=5)
    ticks = dict(zip(fig.axes[0].get_yticks(), (t.get_text() for t in fig.axes[0].get_yticklabels())))
    assert ticks[max(ticks)] == grid_names(GRID)[7] and len(ticks) == 5  # best region at the top
    assert save_figure(fig, tmp_path / "rank.png").stat().st_size > 5000
    fig = confusion_figure([[3, 1], [0, 4]], ["NC", "AD"])
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"3", "1", "0", "4"} <= texts


def test_atlas_label_tables(tmp_path):
    (tmp_path / "a.tsv").write_text("index\tname\n1\tHippocampus_L\n2\tAmygdala_L\n")
    (tmp_path / "b.csv").write_text("1,Hippocampus_L,x\n2,Amygdala_L,y\n")
    (tmp_path / "c.txt").write_text("# FreeSurfer LUT\n17  Left-Hippocampus  220 216 20 0\n")
    assert load_atlas_labels(tmp_path / "a.tsv") == {1: "Hippocampus_L", 2: "Amygdala_L"}
    assert load_atlas_labels(tmp_path / "b.csv") == {1: "Hippocampus_L", 2: "Amygdala_L"}
    assert load_atlas_labels(tmp_path / "c.txt") == {17: "Left-Hippocampus"}
    (tmp_path / "bad.tsv").write_text("1\tA\nB\tC\n")
    with pytest.raises(RegionError, match="integer"):
        load_atlas_labels(tmp_path / "bad.tsv")
    (tmp_path / "atlas.nii.gz").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")  # the volume passed by mistake
    with pytest.raises(RegionError, match="as text.*TSV/CSV"):
        load_atlas_labels(tmp_path / "atlas.nii.gz")


def test_atlas_that_is_not_nifti_is_a_clear_error(tmp_path):
    from masan.evaluate.region_ranking import resample_atlas

    (tmp_path / "atlas.nii").write_text("not an image")
    with pytest.raises(RegionError, match="cannot read atlas"):
        resample_atlas(tmp_path / "atlas.nii", (4, 4, 4), np.eye(4))
    nib.save(nib.Nifti1Image(np.zeros((2, 2), np.int16), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(RegionError, match="3-D"):
        resample_atlas(tmp_path / "flat.nii", (4, 4, 4), np.eye(4))
