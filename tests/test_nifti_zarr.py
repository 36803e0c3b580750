"""Every subject image of a store is NIfTI-Zarr 1.0: checked with the external tools themselves.

The real NIfTI files nibabel ships go through to_zarr, then the ``nifti-zarr`` package's
``zarr2nii`` (not our reader) must give back the file's voxels, affine exactly and the TR the store uses, and
``ome-zarr-models`` must accept every image as an OME-Zarr 0.5 image. Stores of the previous
layout (format 1: bare arrays) still read and verify.
"""

import io
import shutil

import nibabel as nib
import numpy as np
import pytest
import zarr

from masan.convert.subject import verify_group
from masan.store import nifti_zarr
from masan.store.cohort import CohortStore
from test_data_convert import DATA, REAL, real_manifest, to_zarr

niizarr = pytest.importorskip("niizarr", reason="the nifti-zarr package (pip install '.[test]')")
ome_zarr_models = pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (pip install '.[test]')")

LEVELS = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("niizarr")
    rc = to_zarr.main(["--manifest", str(real_manifest(tmp)), "--out", str(tmp / "s.zarr"), "--require", "t1",
                       "--nan", "zero", "--levels", str(LEVELS), "--no-progress", "--keep-orientation"])
    assert rc == 0  # the files' own voxel order: zarr2nii must give back each file exactly
    return CohortStore(tmp / "s.zarr")


def images(store):
    """(subject, modality, source file, image folder) of every image in the store; the folder
    is the version-free path (``subjects/<id>/current/<modality>``) that other tools open."""
    for s, files in REAL.items():
        for modality, name in zip(("t1", "fmri"), files[:2]):
            if name:
                folder = store.image_path(s, modality)
                assert folder.resolve() == (store.path / store.group_path(s) / modality).resolve()
                yield s, modality, DATA / name, folder


def test_every_real_file_round_trips_through_zarr2nii(store):
    seen = []
    for subject, modality, path, folder in images(store):
        src = nib.load(path)
        back = niizarr.zarr2nii(str(folder))
        want = np.asarray(src.dataobj.get_unscaled())
        if modality == "t1":
            want = want.reshape(want.shape[:3])
        want = np.where(np.isnan(want), 0, want)  # --nan zero (resampled_anat_moved.nii's background)
        got = np.asarray(back.dataobj)
        assert got.shape == want.shape and got.dtype == want.dtype.newbyteorder("="), (path, got.shape)
        assert np.array_equal(got, want), path
        assert np.array_equal(back.header.get_best_affine(), src.affine), path
        assert type(back.header) is type(src.header), path  # NIfTI-2 stays NIfTI-2
        assert back.header.get_xyzt_units()[0] == src.header.get_xyzt_units()[0]
        if modality == "fmri":  # the TR the store uses, in seconds (0: none; nibabel's example4d says 2000 s)
            tr = store.meta(subject, "fmri")["tr_seconds"]
            assert back.header.get_zooms()[3] == pytest.approx(tr or 0), path
            assert back.header.get_xyzt_units()[1] == "sec", path
        # nibabel drops scl_slope/inter when it builds an image from an array, so the scaling
        # is checked in the `nifti` header array itself, parsed by the external package.
        header = niizarr.bin2nii(np.asarray(zarr.open_array(folder / "nifti", mode="r")).tobytes())
        assert float(header["scl_slope"]) == pytest.approx(src.dataobj.slope, rel=0, abs=0), path
        assert float(header["scl_inter"]) == src.dataobj.inter, path
        seen.append(path.name)
    assert sorted(seen) == sorted(f for files in REAL.values() for f in files[:2] if f)


def test_every_image_is_a_valid_ome_zarr(store):
    for _, modality, _, folder in images(store):
        image = ome_zarr_models.open_ome_zarr(zarr.open_group(folder, mode="r"))
        assert type(image).__module__.startswith("ome_zarr_models.v05"), type(image)
        multiscale = image.attributes.ome.multiscales[0]
        assert [a.name for a in multiscale.axes] == nifti_zarr.axes(modality)
        assert [d.path for d in multiscale.datasets] == [str(k) for k in range(LEVELS)]


def test_lower_level_is_half_size_with_the_right_affine(store):
    """Level 1 (for viewers) read by zarr2nii: X, Y, Z halved, voxels twice as large, same field of view.
    (zarr2nii 1.0.0rc8 cannot rescale a header without a qform: standard.nii.gz is left out.)"""
    for _, _, path, folder in images(store):
        src = nib.load(path)
        if not src.header["qform_code"]:
            continue
        back = niizarr.zarr2nii(str(folder), level=1)
        assert back.shape[:3] == tuple(-(-n // 2) for n in src.shape[:3]), path
        half = np.diag([2.0, 2.0, 2.0, 1.0])
        half[:3, 3] = 0.5
        assert np.allclose(back.header.get_best_affine(), src.affine @ half, atol=1e-4), path


def test_transformed_image_header_matches_the_stored_array(tmp_path):
    """--canonical and a crop change the stored array: the `nifti` header describes it, not the file."""
    man = tmp_path / "m.csv"
    man.write_text(f"subject,t1,fmri,label\ns1,{DATA / 'anatomical.nii'},{DATA / 'functional.nii'},NC\n")
    assert to_zarr.main(["--manifest", str(man), "--out", str(tmp_path / "s.zarr"), "--canonical",
                         "--t1-shape", "30", "40", "20", "--fmri-shape", "16", "20", "3", "--no-progress"]) == 0
    store = CohortStore(tmp_path / "s.zarr")
    for modality in ("t1", "fmri"):
        folder = store.path / store.group_path("s1") / modality
        ome_zarr_models.open_ome_zarr(zarr.open_group(folder, mode="r"))  # one level (the default) is valid too
        back = niizarr.zarr2nii(str(folder))
        raw = store.read_raw("s1", modality)
        assert np.array_equal(np.asarray(back.dataobj), raw if modality == "t1" else np.moveaxis(raw, 0, 3))
        assert np.allclose(back.header.get_best_affine(), store.affine("s1", modality), atol=1e-5)
        assert nib.aff2axcodes(back.header.get_best_affine()) == ("R", "A", "S")


def test_previous_layout_still_reads_and_verifies(store, tmp_path):
    """A format-1 store (each modality a bare array carrying our attributes) reads the same."""
    old = tmp_path / "old.zarr"
    shutil.copytree(store.path, old)
    s = "s1"
    group = zarr.open_group(old / store.group_path(s), mode="r+")
    for modality in ("t1", "fmri"):
        level0, meta = nifti_zarr.open_image(group[modality])
        data = level0[...]
        del group[modality]
        arr = group.create_array(modality, shape=data.shape, dtype=data.dtype, chunks=level0.chunks)
        arr[...] = data
        arr.update_attributes({**meta, "checksum": {"crc32": meta["checksum"]["crc32"]}})
    legacy = CohortStore(old)
    for modality in ("t1", "fmri"):
        assert not nifti_zarr.is_image_group(zarr.open_group(old / store.group_path(s), mode="r")[modality])
        assert np.array_equal(legacy.read_raw(s, modality), store.read_raw(s, modality))
        assert legacy.meta(s, modality)["stats"] == store.meta(s, modality)["stats"]
    assert np.array_equal(legacy.read_fmri(s), store.read_fmri(s))
    assert verify_group(zarr.open_group(old / store.group_path(s), mode="r")) == []

    # rerunning to_zarr upgrades it: the format is part of the options fingerprint
    attrs = dict(group.attrs)
    group.update_attributes({"options": {**attrs["options"], "format_version": 1}})
    assert to_zarr.main(["--manifest", str(real_manifest(tmp_path)), "--out", str(old), "--require", "t1",
                         "--nan", "zero", "--levels", str(LEVELS), "--no-progress", "--keep-orientation"]) == 0
    upgraded = CohortStore(old)
    assert upgraded.report()["converted"] == [s]
    image = zarr.open_group(old / upgraded.group_path(s), mode="r")["t1"]
    assert nifti_zarr.is_image_group(image)
    assert np.array_equal(upgraded.read_fmri(s), store.read_fmri(s))


def test_header_bytes_are_the_files_own_when_untransformed(store):
    """No reorientation or crop: the `nifti` array is the source header, scaling restored."""
    src = nib.load(DATA / "functional.nii")
    stored = np.asarray(zarr.open_array(store.path / store.group_path("s1") / "fmri" / "nifti", mode="r"))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(stored.tobytes()))
    want = src.header.copy()
    want.set_slope_inter(src.dataobj.slope, src.dataobj.inter)
    assert stored.tobytes() == want.binaryblock
    assert hdr.get_slope_inter() == (src.dataobj.slope, src.dataobj.inter)
