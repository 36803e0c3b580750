"""A store is one Zarr hierarchy: zarr walks from the root to every image, and each subject's
current image opens by a path without the version id (``subjects/<id>/current/t1``).

Real conversions on tiny phantom cohorts; the version-free path is read with the external
``nifti-zarr`` package (``zarr2nii``), not with our reader.
"""

import json
import os
import shutil
import stat
import warnings

import nibabel as nib
import numpy as np
import pytest
import zarr

from masan import access
from masan.convert.cohort import ConvertOptions, convert_cohort, discover_bids
from masan.store.cohort import CURRENT, SUBJECTS, CohortStore
from masan.store.permissions import StoreAccess
from masan.store.publish import VERSION
from masan.synth.phantom import synthesize_cohort

niizarr = pytest.importorskip("niizarr", reason="the nifti-zarr package (pip install '.[test]')")

TINY = {"n_per_class": {"NC": 1, "AD": 1}, "t1_shape": (12, 12, 12), "fmri_shape": (8, 8, 8), "frames": 4,
        "compresslevel": 1}
IMAGES = ("t1", "fmri")


def _convert(bids, out, **opts):
    report = convert_cohort(discover_bids(bids), out, ConvertOptions(**opts), progress=False)
    assert not report.failed, report.failed
    return report


def _t1_file(bids, s):
    return bids / s / "anat" / f"{s}_T1w.nii.gz"


def _members(out):
    """Every node zarr finds walking from the root (keys relative to the store), warnings aside
    (zarr warns about the lock files and the report, which are not nodes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(zarr.open_group(out, mode="r").members(max_depth=None))


def _version(out, s):
    """The version folder name ``current`` points at (a relative link, checked)."""
    link = out / SUBJECTS / s / CURRENT
    assert link.is_symlink(), link
    target = os.readlink(link)
    assert VERSION.match(target), target  # relative, inside the subject's folder
    return target


@pytest.fixture()
def converted(tmp_path):
    bids = synthesize_cohort(tmp_path / "bids", **TINY)
    out = tmp_path / "s.zarr"
    _convert(bids, out)
    return bids, out


def _check_hierarchy(out):
    store = CohortStore(out)
    members = _members(out)
    for s in store.subjects:
        v = _version(out, s)
        assert store.group_path(s) == f"{SUBJECTS}/{s}/{v}"
        attrs = json.loads((out / SUBJECTS / s / "zarr.json").read_text())["attributes"]["masan"]
        assert attrs == {"subject": s, "current": v}
        for node in (SUBJECTS, f"{SUBJECTS}/{s}", f"{SUBJECTS}/{s}/{CURRENT}", f"{SUBJECTS}/{s}/{v}"):
            assert isinstance(members[node], zarr.Group), node
        for m in IMAGES:
            # each image twice: the symlink is walked like a folder (documented)
            for key in (f"{SUBJECTS}/{s}/{CURRENT}/{m}", f"{SUBJECTS}/{s}/{v}/{m}"):
                assert isinstance(members[key], zarr.Group) and "ome" in members[key].attrs, key
            assert store.image_path(s, m) == out / SUBJECTS / s / CURRENT / m
    images = sorted(k for k, node in members.items() if isinstance(node, zarr.Group) and "ome" in node.attrs)
    assert len(images) == 2 * len(IMAGES) * len(store.subjects), images
    return store


def test_zarr_walks_from_the_root_to_every_image(converted):
    _, out = converted
    _check_hierarchy(out)
    pytest.importorskip("rich", reason="Group.tree() draws with rich")
    text = str(zarr.open_group(out, mode="r").tree())
    names = [line.rsplit("── ", 1)[-1] for line in text.splitlines()]
    assert names.count(CURRENT) == 2 and names.count("t1") == 4 and names.count("fmri") == 4, text


def test_zarr2nii_opens_the_version_free_path_with_the_source_voxels(converted):
    bids, out = converted
    for s in CohortStore(out).subjects:
        src = nib.load(_t1_file(bids, s))
        back = niizarr.zarr2nii(str(out / SUBJECTS / s / CURRENT / "t1"))
        assert np.array_equal(np.asarray(back.dataobj), np.asarray(src.dataobj.get_unscaled())), s
        assert np.allclose(back.header.get_best_affine(), src.affine)


def test_reconversion_moves_current_and_removes_the_old_version(converted):
    bids, out = converted
    s = "sub-001"
    before = _version(out, s)
    path = _t1_file(bids, s)
    src = nib.load(path)
    changed = np.asarray(src.dataobj)[::-1].copy()  # a changed source: mirrored voxels
    nib.save(nib.Nifti1Image(changed, src.affine, src.header), path)
    report = _convert(bids, out)
    assert report.converted == [s] and report.skipped == ["sub-002"]
    after = _version(out, s)
    assert after != before and not (out / SUBJECTS / s / before).exists()
    assert sorted(p.name for p in (out / SUBJECTS / s).iterdir()) == sorted([after, CURRENT, "zarr.json"])
    back = niizarr.zarr2nii(str(out / SUBJECTS / s / CURRENT / "t1"))
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(nib.load(path).dataobj.get_unscaled()))
    _check_hierarchy(out)


def test_stores_without_subject_groups_read_and_a_rerun_adds_them(converted):
    """A store of the previous layout (no ``subjects/zarr.json``, ``subjects/<id>/zarr.json``
    or ``current``) reads as before; a rerun that converts nothing adds them. A copy that followed the
    links (``shutil.copytree``) has ``current`` as a folder: the rerun makes it a link again."""
    bids, out = converted
    want = {s: CohortStore(out).read_raw(s, "t1") for s in CohortStore(out).subjects}
    old = out.parent / "old.zarr"
    shutil.copytree(out, old)
    (old / SUBJECTS / "zarr.json").unlink()
    for s in want:
        (old / SUBJECTS / s / "zarr.json").unlink()
        shutil.rmtree(old / SUBJECTS / s / CURRENT)
    store = CohortStore(old)
    assert all(np.array_equal(store.read_raw(s, "t1"), t1) for s, t1 in want.items())
    assert _convert(bids, old).skipped == sorted(want)
    _check_hierarchy(old)

    copied = out.parent / "copied.zarr"
    shutil.copytree(out, copied)  # follows symlinks: current/ becomes a full copy
    assert not (copied / SUBJECTS / "sub-001" / CURRENT).is_symlink()
    assert _convert(bids, copied).skipped == sorted(want)
    _check_hierarchy(copied)


def test_subject_groups_are_no_more_open_than_the_store(tmp_path):
    """The files we add follow the store's mode (from owner-only sources: 600) whatever the
    umask, and an explicit --mode 640 reaches them too."""
    bids = synthesize_cohort(tmp_path / "bids", **TINY)
    for p in [bids, *bids.rglob("*")]:
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    out = tmp_path / "s.zarr"
    old = os.umask(0o022)
    try:
        _convert(bids, out)
        assert access.more_open_than(out, 0o600) == []
        for s in ("sub-001", "sub-002"):
            assert stat.S_IMODE((out / SUBJECTS / s / "zarr.json").stat().st_mode) == 0o600
        convert_cohort(discover_bids(bids), out, ConvertOptions(clevel=3), progress=False,
                       share=StoreAccess(mode=0o640))
        assert stat.S_IMODE((out / SUBJECTS / "sub-001" / "zarr.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
