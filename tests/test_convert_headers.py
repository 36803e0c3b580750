"""What the converter makes of headers that do not say enough or say it their own way: a file
without orientation, a corrupt frame deep in a 4D run, voxel sizes in meters or microns, a time
unit that is no time, a TR from the sidecar, a reoriented acquisition, a sparse run, a file whose
compression contradicts its name. Each case names the file and says what to do, and the stored
header, OME metadata and table agree with each other."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from data_tool import load_tool
from masan.convert.nifti import NiftiError, open_image
from masan.store.cohort import CohortStore
from test_data_convert import _synth, to_zarr, write_manifest

ZOOMS = (1.0, 1.2, 1.5)
T1 = (20, 22, 24)
RUN = (20, 20, 20, 10)
# a sagittal-like PIR acquisition: voxel axis i runs to P (0.5 mm), j to I (4 mm), k to R (0.9 mm)
PIR = np.array([[0, 0, 0.9, -12], [-0.5, 0, 0, 10], [0, -4.0, 0, 40], [0, 0, 0, 1]])


def _image(path: Path, data: np.ndarray, affine: np.ndarray | None, units: tuple[str, str] = ("mm", "sec"),
           tr: float = 2.0, edit: Callable[[nib.Nifti1Header], None] | None = None) -> Path:
    """A NIfTI-1 file of ``data`` placed by ``affine`` (None: sform and qform codes 0, as
    ANALYZE-era conversions leave them, with :data:`ZOOMS` voxels), ``units`` (space, time)
    and pixdim[4] ``tr`` when 4D; ``edit(header)`` changes the header last."""
    img = nib.Nifti1Image(data, affine)  # no affine: both codes stay 0
    zooms = ZOOMS if affine is None else tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    img.header.set_zooms(zooms + ((tr,) if data.ndim == 4 else ()))
    img.header.set_xyzt_units(*units)
    if edit is not None:
        edit(img.header)
    nib.save(img, path)
    return path


def _save(path: Path, data: np.ndarray, oriented: bool = True) -> Path:
    """A NIfTI-1 file of ``data`` with 1.0 x 1.2 x 1.5 mm voxels (2 s frames when 4D);
    ``oriented=False``: sform and qform codes 0."""
    _image(path, data, np.diag([*ZOOMS, 1.0]) if oriented else None)
    back = nib.load(path).header
    assert bool(back["sform_code"] or back["qform_code"]) == oriented
    return path


def _cohort(tmp: Path, t1_oriented: bool = True, fmri: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    """A manifest of two subjects; the T1 of ``odd`` is lopsided (its x order is visible) and
    unoriented when ``t1_oriented`` is False; ``fmri``: odd's run (default: a finite one)."""
    rng = np.random.default_rng(0)
    t1 = rng.normal(100, 10, (10, 11, 12)).astype(np.float32)
    t1[:3] += 50  # a brighter side: a flip of x shows
    run = rng.normal(50, 5, (8, 8, 8, 6)).astype(np.float32)
    rows = []
    for subject, label in (("odd", "AD"), ("ok", "NC")):
        folder = tmp / subject
        folder.mkdir()
        rows.append((subject, _save(folder / "t1.nii.gz", t1, t1_oriented or subject == "ok"),
                     _save(folder / "bold.nii.gz", fmri if fmri is not None and subject == "odd" else run), label))
    manifest = tmp / "cohort.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("subject", "t1", "fmri", "label"), *rows])
    return manifest, t1


def test_a_file_without_orientation_is_refused_unless_las_is_assumed(tmp_path):
    """sform and qform codes 0: nibabel (and FSL) assume LAS, other tools other orders, so the
    head's left and right are a guess: by default its subject fails with the fix; with
    --unoriented assume-las it is converted under that assumption, with a warning."""
    manifest, t1 = _cohort(tmp_path, t1_oriented=False)
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress"]) == 1
    store = CohortStore(out)
    assert store.subjects == ["ok"]
    (failed,) = store.report()["failed"]
    assert failed["subject"] == "odd"
    for fragment in ("odd/t1.nii.gz", "states no orientation", "sform_code and qform_code are 0",
                     "img.set_sform(affine, code=1)", "--unoriented assume-las"):
        assert fragment in failed["error"], (fragment, failed["error"])

    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress",
                         "--unoriented", "assume-las"]) == 0
    store = CohortStore(out)
    assert store.subjects == ["odd", "ok"]
    # LAS reoriented to RAS: x reversed, as nibabel's affine for such a header says
    assert np.array_equal(store.read_t1("odd", normalize=False), t1[::-1])
    assert np.array_equal(store.read_t1("ok", normalize=False), t1)
    assert any("odd/t1.nii.gz" in w and "assumed LAS" in w for w in store.report()["warnings"])


def test_a_bad_frame_is_named_by_its_index(tmp_path):
    run = np.random.default_rng(1).normal(50, 5, (8, 8, 8, 6)).astype(np.float32)
    run[2, 3, 4, 5] = np.inf
    manifest, _ = _cohort(tmp_path, fmri=run)
    out = tmp_path / "s.zarr"
    # slabs (shards) of 2 frames: the Inf lies in the third slab (frames 4-5), at its second frame
    assert to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress",
                         "--fmri-chunk-frames", "2", "--fmri-shard-frames", "2"]) == 1
    (failed,) = CohortStore(out).report()["failed"]
    assert "odd/bold.nii.gz: 1 voxels are +-Inf (the first in frame 5)" in failed["error"], failed["error"]


def _head(seed: int = 0) -> np.ndarray:
    """A float32 T1 of shape :data:`T1`, brighter on its low-x side (a flip shows)."""
    head = np.random.default_rng(seed).normal(300, 40, T1).astype(np.float32)
    head[:4] += 400
    return head


def _bold(seed: int = 1) -> np.ndarray:
    """An int16 run of shape :data:`RUN`."""
    return np.random.default_rng(seed).normal(500, 30, RUN).astype(np.int16)


def _subject(tmp: Path, subject: str, t1_affine: np.ndarray, bold_affine: np.ndarray,
             units: tuple[str, str] = ("mm", "sec"), tr: float = 2.0, sidecar: dict | None = None,
             edit: Callable[[nib.Nifti1Header], None] | None = None) -> tuple[Path, Path]:
    """``tmp/<subject>/t1.nii.gz`` and ``bold.nii.gz`` (with ``bold.json`` holding ``sidecar``, its
    only sidecar: the name is no BIDS name); ``units``, ``tr`` and ``edit`` apply to the run
    (``units`` to both)."""
    folder = tmp / subject
    folder.mkdir()
    if sidecar is not None:
        (folder / "bold.json").write_text(json.dumps(sidecar))
    return (_image(folder / "t1.nii.gz", _head(), t1_affine, units),
            _image(folder / "bold.nii.gz", _bold(), bold_affine, units, tr, edit))


def _convert(tmp: Path, files: dict[str, tuple[Path, Path]], *args: str) -> tuple[int, CohortStore]:
    """to_zarr over a manifest of ``files`` (subject -> (T1, run)); (exit status, the store)."""
    manifest = write_manifest(tmp / "cohort.csv", [(s, t1, run, "AD") for s, (t1, run) in files.items()])
    out = tmp / "s.zarr"
    rc = to_zarr.main(["--manifest", str(manifest), "--out", str(out), "--no-progress", *args])
    return rc, CohortStore(out)


def _stored_header(store: CohortStore, subject: str, modality: str) -> nib.Nifti1Header:
    """The image's NIfTI-Zarr ``nifti`` array: the binary header of the stored array."""
    raw = np.asarray(zarr.open_array(store.image_path(subject, modality) / "nifti", mode="r")).tobytes()
    return nib.Nifti1Header(raw)


def _ome(store: CohortStore, subject: str, modality: str) -> dict:
    """The image's OME-Zarr multiscale image."""
    return dict(zarr.open_group(store.image_path(subject, modality), mode="r").attrs)["ome"]["multiscales"][0]


def _level0_scale(store: CohortStore, subject: str, modality: str) -> list[float]:
    """The OME scale of level 0's space axes (x, y, z)."""
    return _ome(store, subject, modality)["datasets"][0]["coordinateTransformations"][0]["scale"][-3:]


def _edges(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def test_voxel_sizes_in_meters_or_microns_are_read_as_mm(tmp_path):
    """One 1 mm head said in mm, in microns (pixdim 1000) and in meters (0.001): each is stored
    as the mm one, whose stored header says mm, with a warning naming the file; with --spacing the
    micron file no longer asks for a grid kilometres wide nor the meter one for a blank T1."""
    files = {unit: _subject(tmp_path, unit, np.diag([mm] * 3 + [1.0]), np.diag([3 * mm] * 3 + [1.0]), (unit, "sec"))
             for unit, mm in (("mm", 1.0), ("micron", 1000.0), ("meter", 0.001))}
    for args in ([], ["--spacing", "1", "3"]):
        rc, store = _convert(tmp_path, files, *args)
        assert rc == 0 and store.subjects == ["meter", "micron", "mm"], (args, store.report()["failed"])
        for subject in ("micron", "meter"):
            for modality in ("t1", "fmri"):
                assert store.row(subject)[modality]["voxel_mm"] == store.row("mm")[modality]["voxel_mm"], args
                np.testing.assert_allclose(store.affine(subject, modality), store.affine("mm", modality), atol=1e-4)
                header = _stored_header(store, subject, modality)
                assert header.get_xyzt_units() == ("mm", "sec")
                np.testing.assert_allclose(header.get_best_affine(), store.affine(subject, modality), atol=1e-4)
                want = _edges(store.affine("mm", modality))
                np.testing.assert_allclose(_level0_scale(store, subject, modality), want, rtol=1e-5)
            np.testing.assert_allclose(store.read_t1(subject, normalize=False),
                                       store.read_t1("mm", normalize=False), rtol=1e-4)
            t1 = files[subject][0]
            assert any(w.startswith(f"{subject}: {t1}: the header gives voxel sizes and positions in {subject}s")
                       for w in store.report()["warnings"]), store.report()["warnings"]


def test_a_grid_too_large_to_resample_is_refused_naming_the_file_and_the_cause(tmp_path):
    """A header that says mm over voxel sizes in microns (pixdim 1000): --spacing 1 would ask for
    a grid of 10^13 voxels. The subject fails before anything is allocated, naming the file, its
    field of view in mm and the likely causes; the others convert."""
    files = {"huge": _subject(tmp_path, "huge", np.diag([1000.0] * 3 + [1.0]), np.diag([3.0] * 3 + [1.0])),
             "ok": _subject(tmp_path, "ok", np.eye(4), np.diag([3.0] * 3 + [1.0]))}
    rc, store = _convert(tmp_path, files, "--spacing", "1", "3")
    assert rc == 1 and store.subjects == ["ok"]
    (failed,) = store.report()["failed"]
    for fragment in (f"{files['huge'][0]}: resampling its field of view of 19000x21000x23000 mm to 1 mm voxels",
                     "19001x21001x23001 voxels (more than 1,000,000,000)", "voxel sizes 1000x1000x1000 mm",
                     "xyzt_units", "--spacing is too fine"):
        assert fragment in failed["error"], (fragment, failed["error"])


def test_the_stored_header_ome_and_inspect_store_carry_the_tr_the_store_uses(tmp_path, capsys):
    """The TR training reads (the sidecar's, or the header's in seconds, or none) is the one in
    the image's own NIfTI header (pixdim[4], unit sec; 0: none), on the OME ``t`` axis (1 when
    none) and in inspect_store; a time unit that is no time (hz) gives no TR, with a warning."""
    cases = {  # subject: (header pixdim[4], its time unit, sidecar RepetitionTime, the TR stored)
        "side": (2.0, "sec", 3.0, 3.0),  # the sidecar wins (BIDS)
        "zero": (0.0, "sec", 1.5, 1.5),
        "msec": (800.0, "msec", None, 0.8),
        "unit": (2000.0, "sec", None, None),  # milliseconds written as 'sec': refused
        "hz": (0.5, "hz", None, None),  # a frequency, no TR
    }
    files = {s: _subject(tmp_path, s, np.eye(4), np.diag([3.0] * 3 + [1.0]), ("mm", unit), pixdim,
                         None if side is None else {"RepetitionTime": side})
             for s, (pixdim, unit, side, _) in cases.items()}
    rc, store = _convert(tmp_path, files)
    assert rc == 0 and store.subjects == sorted(cases), store.report()["failed"]
    for subject, (_, _, _, tr) in cases.items():
        assert store.row(subject)["fmri"]["tr_seconds"] == pytest.approx(tr), subject
        header = _stored_header(store, subject, "fmri")
        assert float(header.get_zooms()[3]) == pytest.approx(tr or 0.0), subject
        assert header.get_xyzt_units()[1] == "sec", subject
        ome = _ome(store, subject, "fmri")
        assert ome["coordinateTransformations"] == [{"type": "scale", "scale": [pytest.approx(tr or 1.0), 1, 1, 1]}]
        assert ome["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    assert any(w.startswith(f"hz: {files['hz'][1]}: the header's time unit is 'hz', not a time, so its pixdim[4] 0.5 "
                            "is no TR; stored without one") for w in store.report()["warnings"])
    inspect_store = load_tool("inspect_store")
    for subject, shown in (("side", "TR 3 s (from the sidecar)"), ("msec", "TR 0.8 s (from the header)"),
                           ("unit", "TR none")):
        assert inspect_store.main([str(store.path), "--subject", subject]) == 0
        (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("fmri: shape")]
        assert shown in line, line


def _slice_timing(header: nib.Nifti1Header) -> None:
    """Sequential slices along voxel axis k, phase encoding along j (as dcm2niix writes them)."""
    header.set_dim_info(freq=0, phase=1, slice=2)
    header["slice_code"], header["slice_start"], header["slice_end"] = 1, 0, RUN[2] - 1
    header["slice_duration"] = 0.1


@pytest.fixture(scope="module")
def reoriented(tmp_path_factory) -> CohortStore:
    """A store (default --canonical) of ``pir``, an anisotropic PIR acquisition reoriented to
    RAS, and ``ras``, stored in its own voxel order; both runs carry slice timing."""
    tmp = tmp_path_factory.mktemp("reoriented")
    files = {"pir": _subject(tmp, "pir", PIR, PIR @ np.diag([3.0, 3.0, 3.0, 1.0]), edit=_slice_timing),
             "ras": _subject(tmp, "ras", np.eye(4), np.diag([3.0, 3.0, 3.0, 1.0]), edit=_slice_timing)}
    rc, store = _convert(tmp, files)
    assert rc == 0 and store.subjects == ["pir", "ras"], store.report()["failed"]
    return store


def test_a_reoriented_image_has_the_ome_scale_of_its_stored_axes(reoriented):
    """Reoriented to RAS, the PIR voxel axes (P 0.5, I 4, R 0.9 mm) become x: 0.9, y: 0.5,
    z: 4 mm; the OME scale a viewer uses says so, as the stored affine and header do."""
    for modality, factor in (("t1", 1.0), ("fmri", 3.0)):
        want = factor * np.array([0.9, 0.5, 4.0])
        np.testing.assert_allclose(_edges(reoriented.affine("pir", modality)), want, rtol=1e-6)
        np.testing.assert_allclose(_level0_scale(reoriented, "pir", modality), want, rtol=1e-6)
        np.testing.assert_allclose(_stored_header(reoriented, "pir", modality).get_zooms()[:3], want, rtol=1e-6)


def test_reorientation_clears_the_slice_timing_it_would_make_wrong(reoriented):
    """After the axes are permuted, the file's dim_info and slice range would name the wrong
    axis to slice-timing tools: they are cleared. A run stored in its own voxel order keeps them."""
    moved = _stored_header(reoriented, "pir", "fmri")
    assert moved.get_dim_info() == (None, None, None)
    assert [float(moved[f]) for f in ("slice_code", "slice_start", "slice_end", "slice_duration")] == [0, 0, 0, 0]
    kept = _stored_header(reoriented, "ras", "fmri")
    assert kept.get_dim_info() == (0, 1, 2)
    assert [int(kept[f]) for f in ("slice_code", "slice_start", "slice_end")] == [1, 0, RUN[2] - 1]
    assert kept.get_slice_times()[1] == pytest.approx(0.1)


def test_a_sparse_run_timed_by_volume_timing_is_stored_without_a_tr(tmp_path):
    """BIDS times a sparse or clustered run by VolumeTiming, never with RepetitionTime: its own
    sidecar decides over the dataset's RepetitionTime above it, and the run is stored without a
    TR (not the header's 2 s as if uniform), with a warning naming the sidecar."""
    bids = _synth(tmp_path, n=1)  # sub-001..004, header TR 2 s, 6 frames
    (bids / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    own = bids / "sub-001" / "func" / "sub-001_task-rest_bold.json"
    own.write_text(json.dumps({"VolumeTiming": [0, 2, 4.5, 7, 9, 11.5], "AcquisitionDuration": 1.0}))
    out = tmp_path / "s.zarr"
    assert to_zarr.main(["--bids", str(bids), "--out", str(out), "--no-progress"]) == 0
    store = CohortStore(out)
    assert {s: store.row(s)["fmri"]["tr_seconds"] for s in store.subjects} == {
        "sub-001": None, "sub-002": 2.0, "sub-003": 2.0, "sub-004": 2.0}
    assert float(_stored_header(store, "sub-001", "fmri").get_zooms()[3]) == 0
    warning = next(w for w in store.report()["warnings"] if w.startswith("sub-001:") and "VolumeTiming" in w)
    assert f"its sidecar {own} gives VolumeTiming and no RepetitionTime" in warning, warning
    assert "stored without a TR" in warning


def test_a_file_whose_compression_contradicts_its_name_is_told_how_to_rename(tmp_path):
    """nibabel picks its reader by the name, and its error reads like a corrupt file: the
    message says which way to rename instead. Bytes that are no NIfTI at all keep the
    corrupt-file advice."""
    plain = _image(tmp_path / "t1.nii", _head(), np.eye(4))
    gz_as_nii = tmp_path / "gz.nii"
    gz_as_nii.write_bytes(gzip.compress(plain.read_bytes()))
    nii_as_gz = tmp_path / "plain.nii.gz"
    nii_as_gz.write_bytes(plain.read_bytes())
    with pytest.raises(NiftiError) as e:
        open_image(gz_as_nii)
    assert str(e.value) == f"{gz_as_nii}: is gzip-compressed but named .nii: rename it to .nii.gz"
    with pytest.raises(NiftiError) as e:
        open_image(nii_as_gz)
    assert str(e.value) == f"{nii_as_gz}: is uncompressed but named .nii.gz: rename it to .nii or gzip it"
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(NiftiError, match="not a readable NIfTI file .* re-download it"):
        open_image(junk)
