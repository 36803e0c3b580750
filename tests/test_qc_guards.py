"""data_tools/qc_report.py on stores that look fine and are not, and on a run that is stopped.

On copies of the tiny store of tests/conftest.py (QC of one to three subjects each):

- a store whose last conversion did not finish (killed, or still running) says so at the top
  of the page and on the summary line, with the fix, and exits 1;
- a chunk that still decodes, to other values, is caught by the checksums recorded at
  conversion (the subject is flagged unreadable, exit 1), as ``inspect_store.py --verify`` does;
- Ctrl-C or SIGTERM ends the tool in one line (exit 128 + the signal), leaves a partial report
  no more readable than the store, and the next run with the same --out replaces it.
"""

from __future__ import annotations

import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from disks import fill, small_disk
from masan.access import apply_access
from masan.qc.report import MARKER
from masan.store.cohort import LAST_CONVERSION, CohortStore
from test_qc_report import _cli, _flag_text

TESTS = Path(__file__).resolve().parent


def _copy(tiny_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_store, tmp_path / "store.zarr"))


def _run(capsys, store: Path, out: Path, *subjects: str) -> tuple[int, str, str]:
    code = _cli()([str(store), "--out", str(out), "--no-progress", "--subjects", *subjects])
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_a_store_whose_conversion_did_not_finish_is_said_partial(tiny_store, tmp_path, capsys):
    """What a conversion killed (SIGKILL) after 5 of 20 subjects leaves: its record says
    unfinished, without the reason an interrupted one gives, and no report of its own."""
    store = _copy(tiny_store, tmp_path)
    root = zarr.open_group(store, mode="r+")
    root.update_attributes({LAST_CONVERSION: {**root.attrs[LAST_CONVERSION], "converted": 5, "to_convert": 20,
                                              "finished": False, "aborted": None}})
    code, out, _ = _run(capsys, store, tmp_path / "qc", "sub-001")
    assert code == 1
    summary = out.splitlines()[0]
    fix = "rerun data_tools/to_zarr.py with the same inputs and --out to finish it (it resumes where it stopped)"
    for line in (summary, (tmp_path / "qc" / "index.html").read_text()):
        assert "did not finish (killed, or running now) after converting 5 of 20 subjects" in line, line
        assert fix in line, line
    page = (tmp_path / "qc" / "index.html").read_text()
    banner = page.index("class='unfinished'")
    assert banner < page.index("subjects, <b>0 flagged</b>") < page.index("id='cohort'")  # above everything else


def _overwrite_a_value(store: Path, subject: str, modality: str) -> None:
    """Change one stored voxel of level 0 through zarr: its chunk is re-encoded and decodes
    cleanly, to a value the conversion's checksum does not cover (bit rot that the codec misses)."""
    arr = zarr.open_array(store / CohortStore(store).group_path(subject) / modality / "0", mode="r+")
    at = tuple(n // 2 for n in arr.shape)
    arr[at] = arr[at] + 7


def test_a_chunk_that_decodes_to_other_values_is_caught_by_its_checksum(tiny_store, tmp_path, capsys):
    store = _copy(tiny_store, tmp_path)
    _overwrite_a_value(store, "sub-002", "fmri")
    _overwrite_a_value(store, "sub-003", "t1")
    assert CohortStore(store).read_raw("sub-002", "fmri").size  # it reads: the codec sees nothing wrong
    code, out, err = _run(capsys, store, tmp_path / "qc", "sub-001", "sub-002", "sub-003")
    assert code == 1 and "Traceback" not in err, err
    lines = {line.split()[1].rstrip(":"): line for line in err.splitlines() if "UNREADABLE" in line}
    assert sorted(lines) == ["sub-002", "sub-003"], err
    for subject, modality in (("sub-002", "fmri"), ("sub-003", "t1")):
        assert f"the {modality} under" in lines[subject] and "does not match the checksum" in lines[subject]
        assert "to_zarr.py" in lines[subject] and "--verify" in lines[subject]
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "checksum" in _flag_text(page, "sub-002", "unreadable")
    assert "id='sub-001' data-flags=''" in page  # the intact subject is checked as before
    assert sorted(p.name for p in (tmp_path / "qc").glob("*.png")) == ["sub-001_fmri.png", "sub-001_views.png"]


STOPPED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from data_tool import load_tool
from masan.qc import figures
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: Ctrl-C raises KeyboardInterrupt
draw, calls = figures.t1_views_figure, []
def views(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second subject's first figure: the first subject's PNGs are written
        os.kill(os.getpid(), {signum})
    return draw(*args, **kwargs)
figures.t1_views_figure = views
sys.exit(load_tool("qc_report").main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_report_says_what_it_left_in_one_line_and_a_rerun_replaces_it(tiny_store, tmp_path, capsys, sig):
    store = _copy(tiny_store, tmp_path)
    apply_access(store, 0o600)  # a store only its owner reads: so must be a half-written report
    out = tmp_path / "qc"
    res = subprocess.run([sys.executable, "-c", STOPPED.format(tests=str(TESTS), signum=int(sig)), str(store),
                          "--out", str(out), "--no-progress", "--subjects", "sub-001", "sub-002"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 128 + sig, res.stderr
    assert res.stderr == (f"qc_report: interrupted by {sig.name}: {out} holds a partial report (2 PNGs, no "
                          "index.html); rerunning the same command (the same --out) replaces it\n")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "sub-001_fmri.png", "sub-001_views.png"]
    assert stat.S_IMODE(out.stat().st_mode) & 0o777 == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}

    code, _, err = _run(capsys, store, out, "sub-002")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "index.html", "sub-002_fmri.png", "sub-002_views.png"]


def test_a_full_disk_under_out_is_one_line_saying_what_was_left(tiny_store, tmp_path, capsys):
    store = _copy(tiny_store, tmp_path)
    subjects = CohortStore(store).subjects[:2]
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "qc"
        fill(disk, 64 * 1024)  # room for the marker, not for the figures
        code, _, err = _run(capsys, store, out, *subjects)
        assert code == 2, err
        assert "no space left on the device" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
