"""data_tools/inspect_store.py on the tiny store of tests/conftest.py: the access it reports is
the store's now, an unknown --subject is named without pointing back at the tool, and a reader
that stops early (``| head``) ends it without a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from data_tool import load_tool
from masan.store.cohort import CohortStore

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "data_tools" / "inspect_store.py"


def _main():
    return load_tool("inspect_store").main


def test_access_is_the_stores_now_and_a_change_since_conversion_is_said(tmp_path, tiny_store, capsys):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store.zarr"))
    recorded = CohortStore(store).attrs["access"]["file_mode"]
    store.chmod(0o755 if recorded == "600" else 0o700)  # other than recorded, e.g. chmod 700 after a 644 conversion
    now = "644, folders 755" if recorded == "600" else "600, folders 700"
    assert _main()([str(store)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("access:"))
    assert line.startswith(f"access: files {now}") and f"the conversion recorded files {recorded}" in line, line

    store.chmod(0o700 if recorded == "600" else 0o755)
    assert _main()([str(store)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("access:"))
    assert line.startswith(f"access: files {recorded}") and "as recorded at conversion" in line, line


def test_an_unknown_subject_lists_the_stores_subjects(tiny_store, capsys):
    assert _main()([str(tiny_store), "--subject", "sub-zzz"]) == 2
    err = capsys.readouterr().err
    assert f"--subject sub-zzz is not in {tiny_store} (10 subjects: sub-001, sub-002" in err, err
    assert "inspect_store.py" not in err and err.count("\n") == 1, err


def test_a_reader_that_stops_early_gets_no_traceback(tiny_store):
    """As ``inspect_store.py STORE | head -3`` once head has exited: every write meets a closed pipe."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, str(TOOL), str(tiny_store)], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120, cwd=REPO, check=False)
    finally:
        os.close(write)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 1



def test_verify_names_a_current_link_left_at_another_version(tmp_path, tiny_store, capsys):
    """A conversion stopped between the table's write and the link's left `current` at the old
    version: readers follow the table, but --verify said '0 damaged' to one who opened files."""
    store = Path(shutil.copytree(tiny_store, tmp_path / "s.zarr", symlinks=True))
    subject = CohortStore(store).subjects[0]
    folder = store / "subjects" / subject
    version = Path(CohortStore(store).group_path(subject)).name
    shutil.copytree(folder / version, folder / "v1")
    (folder / "current").unlink()
    (folder / "current").symlink_to("v1")
    assert _main()([str(store), "--verify"]) == 1
    out = capsys.readouterr()
    assert f"subjects/{subject}/current does not point at {version}" in out.out + out.err
