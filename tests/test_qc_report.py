"""data_tools/qc_report.py: the QC report of a real converted cohort with planted bad subjects.

The cohort is the demo's phantom (masan.data.synth, 3 NC + 3 AD, T1 32^3, fMRI 16^3 x 8)
plus subjects made wrong on purpose with nibabel, converted by the real converter:
a constant T1, a clipped T1, an fMRI whose affine puts it 2 m away from its T1, an fMRI
stored in another voxel orientation, a truncated fMRI run, and one subject whose conversion
fails (listed on the cohort page). The browser test opens the report in a real headless
Chromium (playwright), checks that every image decodes and that each bad subject, and only
those, is shown as flagged.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

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
}


def _save(path: Path, data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image) -> Path:
    img = nib.Nifti1Image(data, affine, like.header.copy())
    img.set_sform(affine, 1)
    img.set_qform(affine, 1)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory) -> Path:
    from masan.data.convert import ConvertOptions, convert_cohort, read_manifest
    from masan.data.synth import synthesize_cohort

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
    # the same image in world space, stored with the x axis reversed (LAS instead of RAS)
    flip_aff = fmri_img.affine @ nib.orientations.inv_ornt_aff(np.array([[0, -1], [1, 1], [2, 1]]), fmri.shape[:3])
    flip = _save(bad / "flip_bold.nii.gz", fmri[::-1].copy(), flip_aff, fmri_img)
    short = _save(bad / "short_bold.nii.gz", fmri[..., :3].copy(), fmri_img.affine, fmri_img)

    def good(subject: str, modality: int) -> Path:
        """A private copy of sub-002's file (one file listed for two subjects is refused)."""
        src = files["sub-002"][modality]
        return Path(shutil.copy(src, bad / f"{subject}_{src.name}"))

    rows += [["sub-const", const, good("sub-const", 1), "NC"], ["sub-clip", clip, good("sub-clip", 1), "AD"],
             ["sub-fov", good("sub-fov", 0), fov, "NC"], ["sub-flip", good("sub-flip", 0), flip, "AD"],
             ["sub-short", good("sub-short", 0), short, "NC"],
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
    from masan.data.qc import QCOptions, write_report

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
    assert flagged["sub-flip"] == ["orientation"]  # same world image: overlap and intensities are fine
    assert res["subjects"] == 11
    page = (out / "index.html").read_text()
    assert "sub-broken" in page and "absent_bold.nii.gz" in page  # the conversion failure, on the cohort page
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 22 and "sub-001_t1.png" in pngs and "sub-001_fmri.png" in pngs


def test_report_is_no_more_readable_than_the_store(report_dir):
    out, res = report_dir
    assert stat.S_IMODE(out.stat().st_mode) & 0o777 == 0o700  # (plus set-gid: files keep the group)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}
    assert res["access"].startswith("files 600")


def _cli():
    """data_tools/qc_report.py as a module (in-process: each interpreter start costs seconds here)."""
    spec = importlib.util.spec_from_file_location("qc_report", QC_REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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
    assert "FLAGGED sub-short: frames" in out and "1 flagged" in out
    code, _, _ = run(qc_store, "--out", tmp_path / "o3", "--subjects", "sub-001")  # replaces the earlier report
    assert code == 0 and sorted(p.name for p in (tmp_path / "o3").iterdir()) == [
        "index.html", "sub-001_fmri.png", "sub-001_t1.png"]


def test_every_option_of_the_tool_sets_its_field():
    """QCOptions owns the tool's options: each flag lands in its field, the rest keep their defaults."""
    from masan.data.qc import QCOptions

    spec = importlib.util.spec_from_file_location("qc_report", QC_REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(["s.zarr", "--out", "o", "--subjects", "a", "b", "--min-frames", "7",
                                          "--z-threshold", "5", "--clip-fraction", "0.2", "--fov-overlap", "0.3",
                                          "--slices", "4"])
    opts = QCOptions.from_args(args, progress=False)
    assert opts == QCOptions(subjects=["a", "b"], min_frames=7, z_threshold=5.0, clip_fraction=0.2, fov_overlap=0.3,
                             mosaic_slices=4, progress=False)
    assert QCOptions.from_args(mod.build_parser().parse_args(["s.zarr", "--out", "o"])) == QCOptions()


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
            assert len(images) == 22 and all(done and width > 0 for _, done, width in images), images
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
