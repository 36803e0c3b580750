"""data_tools/qc_report.py: the QC report of a real converted cohort with planted bad subjects.

The cohort is the demo's phantom (masan.synth.phantom, 3 NC + 3 AD, T1 32^3, fMRI 16^3 x 8)
plus subjects made wrong on purpose with nibabel, converted by the real converter (no
--canonical, so each is stored in its file's voxel order): a constant T1, a clipped T1, an
fMRI whose affine puts it 2 m away from its T1, an fMRI stored in another voxel orientation,
a truncated fMRI run, a T1 with another voxel size, fMRIs with another TR and with none, a
subject stored mirrored (T1 and fMRI LAS among RAS), and one subject whose conversion fails
(listed on the cohort page). A copy of the store then loses a chunk, has one corrupted and
one subject folder made unreadable (chmod 000; not as root, whom permissions do not stop):
each is reported with its cause and the other subjects are still checked. The browser test
opens the report in a real headless Chromium (playwright), checks that every image decodes
and that each bad subject, and only those, is shown as flagged.
"""

from __future__ import annotations

import csv
import html
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_tool import load_tool
from masan.qc.report import MARKER

REPO = Path(__file__).resolve().parents[1]
QC_REPORT = REPO / "data_tools" / "qc_report.py"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
"""Executables tried when playwright has no browser of its own (Debian: apt-get install chromium-headless-shell)."""

PLANTED = {  # subject -> the flag it must get
    "sub-const": "constant",
    "sub-clip": "clipped",
    "sub-fov": "fov",
    "sub-flip": "orientation",
    "sub-short": "frames",
    "sub-vox": "voxel_size",
    "sub-tr": "tr",
    "sub-notr": "tr",
    "sub-mirror": "mirrored",
}
LAS = np.array([[0, -1], [1, 1], [2, 1]])
"""nibabel orientation: the first voxel axis reversed (RAS -> LAS), the others kept."""


def _save(path: Path, data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image, tr: float | None = None) -> Path:
    """``data`` as a NIfTI with ``like``'s header, ``affine`` as sform and qform (and TR ``tr`` s)."""
    img = nib.Nifti1Image(data, affine, like.header.copy())
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    if tr is not None:
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    nib.save(img, path)
    return path


def _mirrored(img: nib.Nifti1Image, name: Path) -> Path:
    """The same image in world space stored with the x axis reversed (LAS instead of RAS)."""
    data = np.asarray(img.dataobj)
    return _save(name, data[::-1].copy(), img.affine @ nib.orientations.inv_ornt_aff(LAS, data.shape[:3]), img)


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory) -> Path:
    from masan.convert.cohort import ConvertOptions, convert_cohort, read_manifest
    from masan.synth.phantom import synthesize_cohort

    root = tmp_path_factory.mktemp("qc")
    bids = synthesize_cohort(root / "bids", n_per_class=3, classes=("NC", "AD"), frames=8)
    files = {s: (bids / s / "anat" / f"{s}_T1w.nii.gz", bids / s / "func" / f"{s}_task-rest_bold.nii.gz")
             for s in (f"sub-{i:03d}" for i in range(1, 7))}
    rows = [[s, t1, fmri, "NC" if i % 2 == 0 else "AD"] for i, (s, (t1, fmri)) in enumerate(files.items())]
    bad = root / "bad"
    bad.mkdir()
    t1_img, fmri_img = (nib.load(f) for f in files["sub-001"])
    t1, fmri = np.asarray(t1_img.dataobj), np.asarray(fmri_img.dataobj)

    const = _save(bad / "const_T1w.nii.gz", np.full(t1.shape, 500, np.int16), t1_img.affine, t1_img)
    clip = _save(bad / "clip_T1w.nii.gz", np.minimum(t1, np.percentile(t1, 60)).astype(np.int16),
                 t1_img.affine, t1_img)
    far = fmri_img.affine.copy()
    far[:3, 3] += 2000.0  # 2 m away: no overlap with any T1
    fov = _save(bad / "fov_bold.nii.gz", fmri, far, fmri_img)
    flip = _mirrored(fmri_img, bad / "flip_bold.nii.gz")
    short = _save(bad / "short_bold.nii.gz", fmri[..., :3].copy(), fmri_img.affine, fmri_img)
    wide = t1_img.affine.copy()
    wide[:3, 0] *= 1.25  # x voxels 25% wider: the same head placed over a larger field of view
    vox = _save(bad / "vox_T1w.nii.gz", t1, wide, t1_img)
    slow = _save(bad / "slow_bold.nii.gz", fmri, fmri_img.affine, fmri_img, tr=3.0)
    untimed = _save(bad / "untimed_bold.nii.gz", fmri, fmri_img.affine, fmri_img, tr=0.0)  # pixdim[4] 0: no TR

    def good(subject: str, modality: int) -> Path:
        """A private copy of sub-002's file (one file listed for two subjects is refused)."""
        src = files["sub-002"][modality]
        return Path(shutil.copy(src, bad / f"{subject}_{src.name}"))

    rows += [["sub-const", const, good("sub-const", 1), "NC"], ["sub-clip", clip, good("sub-clip", 1), "AD"],
             ["sub-fov", good("sub-fov", 0), fov, "NC"], ["sub-flip", good("sub-flip", 0), flip, "AD"],
             ["sub-short", good("sub-short", 0), short, "NC"],
             ["sub-vox", vox, good("sub-vox", 1), "AD"], ["sub-tr", good("sub-tr", 0), slow, "NC"],
             ["sub-notr", good("sub-notr", 0), untimed, "AD"],
             ["sub-mirror", _mirrored(t1_img, bad / "mirror_T1w.nii.gz"),
              _mirrored(fmri_img, bad / "mirror_bold.nii.gz"), "NC"],
             ["sub-broken", good("sub-broken", 0), bad / "absent_bold.nii.gz", "AD"]]
    manifest = root / "cohort.csv"
    with manifest.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "t1", "fmri", "label"])
        w.writerows(rows)
    store = root / "cohort.zarr"
    report = convert_cohort(read_manifest(manifest), store, ConvertOptions(patch_grid=(2, 2, 2)),
                            classes=("NC", "AD"), progress=False)
    assert [f.subject for f in report.failed] == ["sub-broken"], report.failed
    return store


@pytest.fixture(scope="module")
def report_dir(qc_store, tmp_path_factory) -> tuple[Path, dict]:
    from masan.access import apply_access
    from masan.qc.options import QCOptions
    from masan.qc.report import write_report

    apply_access(qc_store, 0o600)  # a store only its owner reads: so must be its report
    out = tmp_path_factory.mktemp("report") / "qc"
    return out, write_report(qc_store, out, QCOptions(progress=False))


def test_planted_subjects_and_only_those_are_flagged(report_dir):
    out, res = report_dir
    flagged = res["flagged"]
    for subject, code in PLANTED.items():
        assert code in flagged.get(subject, []), (subject, flagged.get(subject))
    # the phantom subjects (and the good halves reused by the bad ones) raise nothing
    assert set(flagged) == set(PLANTED), flagged
    # same world image: overlap and intensities are fine; its fMRI is mirrored against its T1 and the cohort's
    assert flagged["sub-flip"] == ["mirrored", "orientation"]
    # one cause, one flag: the geometry subjects' images are otherwise the phantom's
    for subject in ("sub-vox", "sub-tr", "sub-notr", "sub-mirror"):
        assert flagged[subject] == [PLANTED[subject]], (subject, flagged[subject])
    assert res["subjects"] == 15 and res["unreadable"] == {}
    page = (out / "index.html").read_text()
    assert "sub-broken" in page and "absent_bold.nii.gz" in page  # the conversion failure, on the cohort page
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 30 and "sub-001_views.png" in pngs and "sub-001_fmri.png" in pngs


def _flag_text(page: str, subject: str, code: str) -> str:
    """The text of ``subject``'s flag ``code`` in the report's HTML."""
    section = page[page.index(f"id='{subject}'"):]
    start = section.index(f"data-flag='{code}'")
    return html.unescape(section[start:section.index("</li>", start)])


def test_geometry_flags_name_the_subject_both_values_and_the_fix(report_dir):
    out, _ = report_dir
    page = (out / "index.html").read_text()
    vox = _flag_text(page, "sub-vox", "voxel_size")
    assert "sub-vox" in vox and "9.375 x 8 x 5.5 mm" in vox and "7.5 x 8 x 5.5 mm (14 of 15 subjects)" in vox
    assert "--register" in vox
    tr = _flag_text(page, "sub-tr", "tr")
    assert "sub-tr" in tr and "3 s" in tr and "2 s (13 of 14 subjects)" in tr and "RepetitionTime" in tr
    notr = _flag_text(page, "sub-notr", "tr")
    assert "sub-notr" in notr and "no TR" in notr and "2 s" in notr and "reconvert" in notr
    mirror = _flag_text(page, "sub-mirror", "mirrored")
    assert "sub-mirror" in mirror and "LAS" in mirror and "RAS, right-handed (14 of 15 subjects)" in mirror
    assert "--canonical" in mirror
    # the cohort page's geometry table lists the odd ones out under the most common value
    geometry = page[page.index("id='geometry'"):page.index("id='failures'")]
    assert "sub-vox" in geometry and "sub-tr" in geometry and "sub-mirror" in geometry


def test_views_are_three_world_cuts_with_their_directions(qc_store, report_dir):
    """Each views figure is three cuts (sagittal, coronal, axial) lettered at their edges; a subject
    stored mirrored (LAS) looks exactly like the RAS subject it was made from: the views show the
    world its affine says, not its voxel order."""
    from matplotlib.image import imread

    from masan.qc import figures
    from masan.store.cohort import CohortStore

    out, _ = report_dir
    views, original = imread(out / "sub-mirror_views.png"), imread(out / "sub-001_views.png")
    assert views.shape == original.shape and np.abs(views - original).max() < 0.02
    assert np.abs(imread(out / "sub-002_views.png") - original).max() > 0.1  # (another subject does differ)

    store = CohortStore(qc_store)
    fig = figures.t1_views_figure(store.read_t1("sub-mirror", normalize=False), store.affine("sub-mirror", "t1"),
                                     None, None)
    cuts = []
    for ax in fig.axes:
        letters = {t.get_text(): t.get_position() for t in ax.texts if len(t.get_text()) == 1}
        if letters:
            cuts.append(letters)
    assert [set(c) for c in cuts] == [{"P", "A", "I", "S"}, {"L", "R", "I", "S"}, {"L", "R", "P", "A"}]
    sagittal, coronal, axial = cuts
    # neurological display: the subject's left on the left, anterior up in the axial cut, nose to the right
    assert coronal["L"][0] < coronal["R"][0] and axial["L"][0] < axial["R"][0] and axial["P"][1] < axial["A"][1]
    assert sagittal["P"][0] < sagittal["A"][0] and sagittal["I"][1] < sagittal["S"][1]


def test_report_is_no_more_readable_than_the_store(report_dir):
    out, res = report_dir
    assert stat.S_IMODE(out.stat().st_mode) & 0o777 == 0o700  # (plus set-gid: files keep the group)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    assert res["access"].startswith("files 600")


def _cli():
    """data_tools/qc_report.py as a module (in-process: each interpreter start costs seconds here)."""
    return load_tool("qc_report").main


def test_cli_errors_name_the_store_and_the_fix(qc_store, tmp_path, capsys):
    main = _cli()

    def run(*args):
        code = main([*map(str, args), "--no-progress"])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = run(tmp_path / "nope.zarr", "--out", tmp_path / "o1")
    assert code == 2 and "nope.zarr" in err and "to_zarr.py" in err
    code, _, err = run(qc_store, "--out", tmp_path / "o2", "--subjects", "sub-zzz")
    assert code == 2 and "sub-zzz" in err and "inspect_store.py" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run(qc_store, "--out", tmp_path / "busy")
    assert code == 2 and "not an earlier QC report" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    code, _, err = run(qc_store, "--out", qc_store / "qc")
    assert code == 2 and "inside the cohort store" in err
    code, out, err = run(qc_store, "--out", tmp_path / "o3", "--subjects", "sub-short", "sub-001")
    assert code == 0, err
    assert "1 flagged" in out
    (flag,) = [line for line in out.splitlines() if line.startswith("  FLAGGED sub-short: frames: ")]
    assert "frames" in flag.split(": ", 2)[2], flag  # what is wrong, in words, not only the code
    code, _, _ = run(qc_store, "--out", tmp_path / "o3", "--subjects", "sub-001")  # replaces the earlier report
    assert code == 0 and sorted(p.name for p in (tmp_path / "o3").iterdir()) == [
        MARKER, "index.html", "sub-001_fmri.png", "sub-001_views.png"]


def test_an_out_predict_would_refuse_is_refused_in_one_line(qc_store, tmp_path, capsys):
    """An existing file, and a folder inside a training run directory (the place check of
    predict and evaluate, masan.store.places)."""
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\ndata: {}\n")
    for out, text in ((afile, f"--out {afile} is an existing file"),
                      (run / "qc", f"--out {run / 'qc'} is inside the training run directory {run}")):
        assert _cli()([str(qc_store), "--out", str(out), "--no-progress"]) == 2, out
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err
    assert afile.read_text() == "mine" and sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def _chunk(store_path: Path, subject: str, modality: str) -> Path:
    """The first chunk (shard) file of a subject's stored array (level 0)."""
    from masan.store.cohort import CohortStore

    level0 = store_path / CohortStore(store_path).group_path(subject) / modality / "0" / "c"
    return min(p for p in level0.rglob("*") if p.is_file())


def test_damaged_subjects_are_reported_with_their_cause_and_the_rest_checked(qc_store, tmp_path, capsys):
    """A missing chunk, a corrupt one and (not as root) an unreadable subject folder: each subject
    is one flag naming the true cause, the report is written, the exit status is 1, no traceback."""
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(qc_store, copy)
    _chunk(copy, "sub-003", "t1").unlink()
    rotten = _chunk(copy, "sub-004", "fmri")
    rotten.write_bytes(bytes(rotten.stat().st_size))  # same size, zeros: the checksum no longer matches
    from masan.store.cohort import CohortStore

    locked = copy / CohortStore(copy).group_path("sub-005")
    can_lock = os.geteuid() != 0  # root reads a mode-000 folder anyway
    if can_lock:
        locked.chmod(0)
    try:
        code = _cli()([str(copy), "--out", str(tmp_path / "qc"), "--no-progress",
                       "--subjects", "sub-001", "sub-003", "sub-004", "sub-005"])
    finally:
        locked.chmod(0o700)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err, err
    lines = {line.split()[1].rstrip(":"): line for line in err.splitlines() if line.strip().startswith("UNREADABLE")}
    assert "missing chunk of the t1" in lines["sub-003"] and "to_zarr.py" in lines["sub-003"]
    assert "corrupt" in lines["sub-004"] and "checksum" in lines["sub-004"] and "to_zarr.py" in lines["sub-004"]
    if can_lock:
        assert f"permission denied reading {locked}" in lines["sub-005"] and "store's owner" in lines["sub-005"]
        assert "chmod" in lines["sub-005"] and "to_zarr.py" not in lines["sub-005"]
    else:
        assert "sub-005" not in lines
    page = (tmp_path / "qc" / "index.html").read_text()
    for subject, line in lines.items():  # one flag, the same cause as on the console
        assert f"id='{subject}' data-flags='unreadable'" in page
        assert _flag_text(page, subject, "unreadable").endswith(line.split("UNREADABLE ", 1)[1])
    # figures for the readable subjects only, none (whole or half-written) for the damaged ones
    pngs = sorted(p.name for p in (tmp_path / "qc").glob("*.png"))
    expected = {"sub-001", *({"sub-005"} - set(lines))}
    assert pngs == sorted(f"{s}_{kind}.png" for s in expected for kind in ("fmri", "views")), pngs
    assert "FLAGGED sub-001" not in out


def test_every_option_of_the_tool_sets_its_field():
    """QCOptions owns the tool's options: each flag lands in its field, the rest keep their defaults."""
    from masan.qc.options import QCOptions

    parser = load_tool("qc_report").build_parser()
    args = parser.parse_args(["s.zarr", "--out", "o", "--subjects", "a", "b", "--min-frames", "7",
                              "--z-threshold", "5", "--clip-fraction", "0.2", "--fov-overlap", "0.3"])
    opts = QCOptions.from_args(args, progress=False)
    assert opts == QCOptions(subjects=["a", "b"], min_frames=7, z_threshold=5.0, clip_fraction=0.2, fov_overlap=0.3,
                             progress=False)
    assert QCOptions.from_args(parser.parse_args(["s.zarr", "--out", "o"])) == QCOptions()
    for flag, value, fragment in (("--clip-fraction", "5", "must be between 0 and 1, got 5"),
                                  ("--min-frames", "-3", "must be at least 1, got -3"),
                                  ("--z-threshold", "nan", "must be a finite number above 0, got nan"),
                                  ("--min-template-corr", "2", "must be between -1 and 1, got 2")):
        res = subprocess.run([sys.executable, str(QC_REPORT), "s.zarr", "--out", "o", flag, value],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 2 and f"argument {flag}: {fragment}" in res.stderr, res.stderr


def test_cli_help_runs_as_a_script():
    res = subprocess.run([sys.executable, str(QC_REPORT), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "--out" in res.stdout and "--min-frames" in res.stdout


# ---------------------------------------------------------------------- the browser


def _launch_browser(playwright):
    """playwright's own Chromium if installed (run.sh keeps it in .venv/ms-playwright), else a
    system Chromium; None when neither."""
    try:
        return playwright.chromium.launch(headless=True)
    except Exception:  # noqa: BLE001 - no playwright-managed browser: try the system's
        pass
    for name in BROWSERS:
        exe = shutil.which(name)
        if exe:
            return playwright.chromium.launch(headless=True, executable_path=exe)
    return None


def test_report_renders_in_a_headless_browser(report_dir, monkeypatch):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]' (bash run.sh setup)")
    out, _ = report_dir
    if (REPO / ".venv" / "ms-playwright").is_dir() and "PLAYWRIGHT_BROWSERS_PATH" not in os.environ:
        monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(REPO / ".venv" / "ms-playwright"))  # run.sh puts it there
    with sync_api.sync_playwright() as p:
        browser = _launch_browser(p)
        if browser is None:
            pytest.skip(f"no headless browser: playwright has no Chromium and none of {BROWSERS} is on PATH; "
                        "bash run.sh setup installs one (apt-get install chromium-headless-shell as root, "
                        "else python -m playwright install chromium-headless-shell)")
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(r.url))
            page.goto((out / "index.html").as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
            assert len(images) == 30 and all(done and width > 0 for _, done, width in images), images
            assert not errors, errors
            shown = page.eval_on_selector_all(
                "section.subject", "els => els.map(e => [e.id, e.className, e.dataset.flags])")
            flagged = {sid: flags.split() for sid, cls, flags in shown if "flagged" in cls.split()}
            assert set(flagged) == set(PLANTED), shown
            for subject, code in PLANTED.items():
                assert code in flagged[subject]
                badge = page.inner_text(f"section#{subject} .badge")
                assert badge.startswith("FLAGGED") and page.is_visible(f"section#{subject} li[data-flag='{code}']")
            assert page.inner_text("section#sub-001 .badge") == "OK"
            assert "sub-broken" in page.inner_text("section#cohort")
            shot = Path(os.environ.get("MASAN_QC_SCREENSHOT", out.parent / "qc_page.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 0
        finally:
            browser.close()
