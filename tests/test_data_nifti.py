"""NIfTI reading on the real files nibabel ships: header facts, exact streaming, reorientation."""

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from masan.convert import nifti

DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
FOUR_D = ["functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]
THREE_D = ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"]


def real(name):
    return os.path.join(DATA, name)


@pytest.mark.parametrize("name", FOUR_D)
@pytest.mark.parametrize("slab", [1, 7, 1000])
def test_frame_slabs_equal_nibabel_unscaled(name, slab):
    img = nifti.open_image(real(name))
    want = img.dataobj.get_unscaled()
    parts = list(nifti.iter_frame_slabs(img, slab))
    assert [t0 for t0, _ in parts] == list(range(0, want.shape[3], slab))
    got = np.concatenate([s for _, s in parts], axis=3)
    assert got.dtype.isnative and got.dtype == want.dtype.newbyteorder("=")
    assert np.array_equal(got, want)


def read_volume(img):
    """All voxels of a 3D image as one (X, Y, Z) slab, the converter's way."""
    (_, slab), = nifti.iter_frame_slabs(img, 1)
    return slab[..., 0]


@pytest.mark.parametrize("name", THREE_D)
def test_a_3d_slab_equals_nibabel(name):
    img = nifti.open_image(real(name))
    got = read_volume(img)
    assert got.dtype.isnative
    assert np.array_equal(got, img.dataobj.get_unscaled(), equal_nan=True)


def test_describe_records_header_facts():
    anat = nifti.describe(nifti.open_image(real("anatomical.nii")))
    assert anat["dtype"] == ">i2" and anat["format"] == "nifti1"
    assert np.array_equal(anat["affine"], nib.load(real("anatomical.nii")).affine)
    assert anat["axcodes"] == ["L", "A", "S"] and anat["tr_seconds"] is None
    func = nifti.describe(nifti.open_image(real("functional.nii")))
    assert func["tr_seconds"] == 2.0 and func["time_unit"] == "sec"
    assert func["scl_slope"] == pytest.approx(0.0754069) and func["scl_inter"] == pytest.approx(3100.7617)
    two = nifti.describe(nifti.open_image(real("example_nifti2.nii.gz")))
    assert two["format"] == "nifti2" and two["sform_code"] == 1
    # the raw header rebuilds the same header
    import base64
    hdr = nib.Nifti1Header(base64.b64decode(anat["header_b64"]))
    assert np.array_equal(hdr.get_best_affine(), nib.load(real("anatomical.nii")).header.get_best_affine())


@pytest.mark.parametrize("name", ["anatomical.nii", "functional.nii"])
def test_canonical_matches_nibabel(name):
    img = nifti.open_image(real(name))
    shape = img.shape
    plan = nifti.SpatialPlan.make(img.affine, shape, canonical=True, shape=None)
    ref = nib.as_closest_canonical(img)
    assert np.allclose(plan.affine, ref.affine)
    assert np.array_equal(plan.apply(np.asarray(img.dataobj)), np.asarray(ref.dataobj))
    assert nib.aff2axcodes(plan.affine) == ("R", "A", "S")


def test_crop_pad_keeps_world_coordinates():
    img = nifti.open_image(real("anatomical.nii"))  # (33, 41, 25), LAS
    data = img.dataobj.get_unscaled()
    plan = nifti.SpatialPlan.make(img.affine, img.shape, canonical=True, shape=(20, 48, 25))
    out = plan.apply(data)
    assert out.shape == (20, 48, 25)
    canon = nifti.SpatialPlan.make(img.affine, img.shape, canonical=True, shape=None)
    cdata = canon.apply(data)
    for j in [(0, 10, 3), (19, 40, 24), (5, 3, 0)]:
        src = np.array(j) + plan.offset
        if np.all(src >= 0) and np.all(src < cdata.shape):
            assert out[j] == cdata[tuple(src)]
            assert np.allclose(plan.affine @ [*j, 1], canon.affine @ [*src, 1])  # same point in mm
        else:
            assert out[j] == 0  # padding
    assert plan.record()["crop_pad_offset"] == [6, -4, 0]


def test_write_slabs_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-500, 500, (5, 6, 7, 9)).astype(np.int16)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    path = nifti.write_nifti_slabs(tmp_path / "x.nii.gz", aff, data.shape, np.int16,
                                   iter([data[..., :4], data[..., 4:]]), (2.0, 3.0, 4.0, 1.5))
    img = nib.load(path)
    assert np.array_equal(np.asarray(img.dataobj), data) and np.array_equal(img.affine, aff)
    assert nifti.describe(img)["tr_seconds"] == 1.5


def test_rank_and_shape_errors_name_the_file():
    func = nifti.open_image(real("functional.nii"))
    with pytest.raises(nifti.NiftiError, match="functional.nii.*must be a 3D volume"):
        nifti.data_shape(func, 3, real("functional.nii"))
    anat = nifti.open_image(real("anatomical.nii"))
    with pytest.raises(nifti.NiftiError, match="anatomical.nii.*must be 4D"):
        nifti.data_shape(anat, 4, real("anatomical.nii"))
    resampled = nifti.open_image(real("resampled_anat_moved.nii"))  # (17, 21, 3): fine
    assert nifti.data_shape(resampled, 3, "x") == (17, 21, 3)


def test_truncated_and_corrupt_files(tmp_path):
    gz = tmp_path / "cut.nii.gz"
    blob = open(real("example4d.nii.gz"), "rb").read()
    gz.write_bytes(blob[: len(blob) // 2])
    img = nifti.open_image(gz)  # the header still loads
    with pytest.raises(nifti.NiftiError, match="cut.nii.gz.*re-export or re-download"):
        list(nifti.iter_frame_slabs(img, 1))
    raw = tmp_path / "cut.nii"
    raw.write_bytes(open(real("anatomical.nii"), "rb").read()[:20000])
    with pytest.raises(nifti.NiftiError, match="cut.nii.*end after"):
        read_volume(nifti.open_image(raw))
    junk = tmp_path / "junk.nii.gz"
    with gzip.open(junk, "wb") as f:
        f.write(b"not a nifti file at all" * 50)
    with pytest.raises(nifti.NiftiError, match="junk.nii.gz.*not a readable NIfTI"):
        nifti.open_image(junk)
    with pytest.raises(nifti.NiftiError, match="file not found"):
        nifti.open_image(tmp_path / "absent.nii")
    shutil.copy(real("anatomical.nii"), tmp_path / "ok.nii")
    assert nifti.open_image(tmp_path / "ok.nii").shape == (33, 41, 25)
