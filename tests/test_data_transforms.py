"""Train-only transforms: off by default, reproducible draws, one spatial transform for T1 and fMRI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from masan.config import AugmentConfig, RunConfig, config_hash, load_config
from masan.data.transforms import Augment

ALL_ON = AugmentConfig(flip=True, rotate_deg=8.0, shift=0.05, scale=0.05, intensity=0.1)


def item(seed: int = 0) -> dict[str, torch.Tensor]:
    """A CohortDataset-shaped item: T1 (1, 16, 16, 12), fMRI (3, 8, 8, 6) on the same field of view."""
    g = torch.Generator().manual_seed(seed)
    return {"t1": torch.randn(1, 16, 16, 12, generator=g), "fmri": torch.randn(3, 8, 8, 6, generator=g),
            "label": torch.tensor(1), "index": torch.tensor(4)}


def test_off_by_default_and_hash_unchanged():
    cfg = load_config(None)
    assert cfg.data.augment == AugmentConfig() and Augment.from_config(cfg.data.augment, 0) is None
    # the new section at its default leaves the fingerprint of older checkpoints as it was
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data)))
    assert config_hash(load_config(None, ["data.augment.flip=true"])) != config_hash(cfg)


def test_shapes_dtypes_and_other_keys_kept():
    x = item()
    out = Augment(ALL_ON, seed=3)(x, index=4, epoch=2)
    for k in ("t1", "fmri"):
        assert out[k].shape == x[k].shape and out[k].dtype == x[k].dtype
        assert not torch.equal(out[k], x[k])
    assert out["label"] is x["label"] and out["index"] is x["index"]
    bf16 = Augment(ALL_ON, seed=3)({k: v.bfloat16() for k, v in x.items() if k in ("t1", "fmri")}, 4, 2)
    assert bf16["t1"].dtype == torch.bfloat16


def test_same_seed_epoch_and_index_give_the_same_transform():
    """A resumed run (a new Augment, a new process) draws what the unbroken run drew."""
    first = Augment(ALL_ON, seed=5)(item(), index=4, epoch=7)
    resumed = Augment(ALL_ON, seed=5)(item(), index=4, epoch=7)
    for k in ("t1", "fmri"):
        assert torch.equal(first[k], resumed[k])
    other_epoch = Augment(ALL_ON, seed=5)(item(), index=4, epoch=8)
    other_subject = Augment(ALL_ON, seed=5)(item(), index=5, epoch=7)
    assert not torch.equal(first["t1"], other_epoch["t1"]) and not torch.equal(first["t1"], other_subject["t1"])


def test_batch_path_draws_what_the_sample_path_draws():
    aug = Augment(ALL_ON, seed=1)
    items = [dict(item(s), index=torch.tensor(i)) for s, i in ((0, 3), (1, 9))]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    out = aug.batch(batch, epoch=4)
    for b, it in enumerate(items):
        one = aug(it, int(it["index"]), 4)
        for k in ("t1", "fmri"):
            assert torch.allclose(out[k][b], one[k])


def flipped_draw(cfg: AugmentConfig) -> tuple[int, int]:
    """(index, epoch) of the first draw that flips, and of the first that does not."""
    aug = Augment(cfg, seed=0)
    draws = [(i, aug.draw(i, 0, (16, 16, 12)).flip) for i in range(20)]
    return next(i for i, f in draws if f), next(i for i, f in draws if not f)


def test_t1_and_fmri_get_the_same_flip():
    cfg = AugmentConfig(flip=True)
    yes, no = flipped_draw(cfg)
    x = item()
    out = Augment(cfg, seed=0)(x, index=yes, epoch=0)
    assert torch.equal(out["t1"], x["t1"].flip(1)) and torch.equal(out["fmri"], x["fmri"].flip(1))
    kept = Augment(cfg, seed=0)(x, index=no, epoch=0)
    assert torch.equal(kept["t1"], x["t1"]) and torch.equal(kept["fmri"], x["fmri"])


@pytest.mark.parametrize("orientation, axis", [("RAS", 0), ("LPS", 0), ("PIR", 2), ("ASL", 2), ("SRA", 1)])
def test_the_flip_mirrors_left_right_whatever_the_stores_orientation(orientation, axis):
    """A store kept in scanner order (``to_zarr.py --keep-orientation``) holds left-right on
    another voxel axis: mirroring its first axis would swap front and back."""
    cfg = AugmentConfig(flip=True)
    yes, _ = flipped_draw(cfg)
    x = item()
    out = Augment(cfg, seed=0, geometry={"orientation": orientation})(x, index=yes, epoch=0)
    assert torch.equal(out["t1"], x["t1"].flip(1 + axis)) and torch.equal(out["fmri"], x["fmri"].flip(1 + axis))


def test_rotations_are_rigid_in_millimetres_for_voxels_that_are_not_cubic():
    """The draw's map, taken back from normalised field-of-view units to millimetres (extent =
    grid shape x voxel size), is a rotation: singular values 1."""
    shape, spacing = (16, 16, 12), (7.5, 8.0, 5.5)
    aug = Augment(AugmentConfig(rotate_deg=10.0), seed=0, geometry={"t1_spacing_mm": list(spacing)})
    half = np.asarray(shape) * np.asarray(spacing)
    for index in range(5):
        a = aug.draw(index, 0, shape, aug.spacing["t1"]).theta[:, :3]
        world = np.diag(half) @ a @ np.diag(1 / half)
        np.testing.assert_allclose(np.linalg.svd(world, compute_uv=False), 1.0, atol=1e-12)
    cubic = Augment(AugmentConfig(rotate_deg=10.0), seed=0).draw(0, 0, shape).theta[:, :3]
    assert not np.allclose(cubic, aug.draw(0, 0, shape, aug.spacing["t1"]).theta[:, :3])


def test_t1_and_fmri_move_to_the_same_place():
    """A bright block at the same place of the field of view in both grids (fMRI at half the T1
    resolution) lands at the same place after a shift and a rotation."""
    t1 = torch.zeros(1, 16, 16, 12)
    t1[0, 2:6, 4:8, 2:6] = 1.0
    fmri = torch.zeros(2, 8, 8, 6)
    fmri[:, 1:3, 2:4, 1:3] = 1.0
    aug = Augment(AugmentConfig(rotate_deg=10.0, shift=0.1), seed=2)
    out = aug({"t1": t1, "fmri": fmri}, index=0, epoch=0)

    def centre(v: torch.Tensor) -> torch.Tensor:  # centre of mass in [0, 1] field-of-view units
        grids = torch.meshgrid(*[(torch.arange(n) + 0.5) / n for n in v.shape], indexing="ij")
        return torch.stack([(g * v).sum() / v.sum() for g in grids])

    before = centre(t1[0])
    assert torch.allclose(before, centre(fmri[0]), atol=1e-6)
    after_t1, after_fmri = centre(out["t1"][0]), centre(out["fmri"][0])
    assert (after_t1 - before).abs().max() > 0.02  # it moved
    assert torch.allclose(after_t1, after_fmri, atol=0.03)
    assert torch.equal(out["fmri"][0], out["fmri"][1])  # every frame alike


def test_identity_parameters_give_identical_tensors():
    x = item()
    aug = Augment(AugmentConfig(rotate_deg=1e-12), seed=0)
    out = aug(x, index=0, epoch=0)
    assert torch.allclose(out["t1"], x["t1"], atol=1e-5) and torch.allclose(out["fmri"], x["fmri"], atol=1e-5)


@pytest.mark.parametrize("override", ["data.augment.shift=1.5", "data.augment.rotate_deg=-1",
                                      "data.augment.intensity=1.5", "data.augment.flips=true"])
def test_bad_values_are_refused(override):
    from masan.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_training_dataset_view_only(tiny_store):
    """Off: the training view is the dataset itself; on: only the view transforms, the
    evaluation dataset stays untransformed."""
    from masan.data.dataset import CohortDataset, select_subjects

    cfg = RunConfig().data
    cfg = dataclasses.replace(cfg, store=str(tiny_store), classes=["NC", "AD"], fmri_frames=6, num_workers=0)
    subjects, labels, _ = select_subjects(tiny_store, cfg)
    ds = CohortDataset(tiny_store, subjects, labels, cfg)
    view = ds.with_transform(Augment(ALL_ON, seed=0), epoch=1)
    plain, augmented = ds[0], view[0]
    assert ds.transform is None and torch.equal(ds[0]["t1"], plain["t1"])
    assert augmented["t1"].shape == plain["t1"].shape and augmented["fmri"].shape == plain["fmri"].shape
    assert not torch.equal(augmented["t1"], plain["t1"])
    assert torch.equal(view[0]["t1"], augmented["t1"])  # the same draw on every read


def test_augmented_items_read_by_workers_are_the_items_read_here(tiny_store):
    """Workers get the augmented view pickled (they start from a fork server, not from this
    process) and draw exactly what a read in this process draws."""
    from masan.data.dataset import CohortDataset, select_subjects
    from masan.data.workers import data_loader

    cfg = dataclasses.replace(RunConfig().data, store=str(tiny_store), classes=["NC", "AD"], fmri_frames=6,
                              num_workers=2)
    subjects, labels, _ = select_subjects(tiny_store, cfg)
    view = CohortDataset(tiny_store, subjects, labels, cfg).with_transform(Augment(ALL_ON, seed=0), epoch=3)
    read = list(data_loader(view, cfg, batch_size=2))
    t1, fmri = torch.cat([b["t1"] for b in read]), torch.cat([b["fmri"] for b in read])
    assert len(t1) == len(view)
    for i in range(len(view)):
        assert torch.equal(t1[i], view[i]["t1"]) and torch.equal(fmri[i], view[i]["fmri"])
