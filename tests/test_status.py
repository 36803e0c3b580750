"""launch/status.py: one table of every run, from what the run directories hold.

Two tiny real runs trained in this process (the conftest's tiny cohort and config, CPU):
one finished, one stopped after a few steps while its (recorded) local launcher still lives.
On the local SLURM cluster, a --repeats array shows up as two array tasks of one job and
ends DONE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import status
from launch.slurm import jobs

REPO = Path(__file__).resolve().parents[1]
LOGGED = ["log.every_steps=1"]  # a loss and a step time at every step: ETA needs two


STOPPED_RUN = """
import sys
from masan.config import load_config
from masan.train.run import run_training
from masan.train.stop import StopRequest

class StopAfter(StopRequest):
    # asks to stop at the 5th step boundary, as `touch RUN_DIR/STOP` would then
    calls = 0
    def agreed(self):
        self.calls += 1
        return self.calls >= 5

cfg = load_config(sys.argv[1], sys.argv[2:])
out = run_training(cfg, StopAfter(cfg.run_dir))
assert out.status == "stopped" and out.step == 5, out
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config) -> Path:
    """A finished run (launch/train_local.py) and one stopped at step 5, trained side by side in
    their own processes (DeepSpeed keeps process-wide state: one run per process)."""
    root = tmp_path_factory.mktemp("runs")
    stopped = root / "sweep" / "repeat_1"
    procs = [subprocess.Popen([sys.executable, str(REPO / "launch" / "train_local.py"), "--config", str(tiny_config),
                               f"run_dir={root / 'finished'}", *LOGGED], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen([sys.executable, "-c", STOPPED_RUN, str(tiny_config), f"run_dir={stopped}",
                               "split.repeat=1", *LOGGED], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    # its launcher is alive (this process), as submit.py --local records one
    jobs.record_job(stopped, str(os.getpid()), "local", "(this terminal)")
    return root


def test_finished_and_unfinished_runs(runs):
    rows = {r.run: r for r in status.collect([runs])}
    assert sorted(rows) == ["finished", "sweep/repeat_1"]
    done, going = rows["finished"], rows["sweep/repeat_1"]

    assert done.done and done.phase == "done" and done.eta_s == 0
    assert done.epochs_done == done.epochs_target == 3
    assert done.checkpoint == f"step_{done.step:06d}" and done.step > 5
    assert done.variant == "MASAN" and done.repeat == 0 and done.slurm == "-" and done.loss is not None

    assert not going.done and going.phase == "pretrain" and going.step == 5
    assert going.checkpoint == "step_000005" and 0 <= going.checkpoint_age_s < 600
    assert 0 < going.epochs_done < 1 and going.epochs_target == 3
    assert going.repeat == 1 and going.slurm == "RUNNING (local)" and going.loss is not None
    # steps left x seconds per step: positive, and no more than a generous bound for this tiny run
    assert going.eta_s is not None and 0 < going.eta_s < 3600
    assert (going.requeues, going.restarts) == (0, 0)


def test_table_and_cli(runs, capsys):
    assert status.main([str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == list(status.COLUMNS)
    line = {row.split()[0]: row for row in out[1:3]}
    assert line["finished"].rstrip().endswith("DONE") and "RUNNING (local)" in line["sweep/repeat_1"]
    assert "step_000005" in line["sweep/repeat_1"] and "pretrain" in line["sweep/repeat_1"]
    assert out[-1] == "2 runs, 1 done"
    assert status.main([str(runs), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["finished"]["done"] and rows["sweep/repeat_1"]["checkpoint"] == "step_000005"
    assert status.main([str(runs / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_watch_refreshes_until_interrupted(runs, capsys, monkeypatch):
    naps = []

    def nap(seconds):  # the second wait is where the user presses Ctrl-C
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(status.time, "sleep", nap)
    assert status.main([str(runs / "finished"), "--watch", "0.5"]) == 0
    assert naps == [0.5, 0.5] and capsys.readouterr().out.count("1 runs, 1 done") == 2


class Outcome:
    """Stands for masan.train.run.TrainOutcome in a submitit result file (any class must do)."""

    def __init__(self, step):
        self.step = step


def test_ended_slurm_jobs_without_an_answering_controller_read_submitit_results(tmp_path):
    import pickle

    folder = tmp_path / "slurm"
    folder.mkdir()
    for jid, result in (("41", ("success", Outcome(7))), ("42_1", ("error", "Traceback ...: ValueError"))):
        (folder / f"{jid}_0_result.pkl").write_bytes(pickle.dumps(result))
    job = {"kind": "slurm", "log": str(folder / "41_0_log.out"), "job_id": "41"}
    assert status.slurm_state(job, None) == "COMPLETED"
    assert status.slurm_state({**job, "job_id": "42_1", "log": str(folder / "42_1_0_log.out")}, None) == "FAILED"
    assert status.slurm_state({**job, "job_id": "43", "log": str(folder / "43_0_log.out")}, None) == \
        "UNKNOWN (no SLURM)"
    assert status.slurm_state(job, {"41": "RUNNING"}) == "RUNNING"  # squeue first


@pytest.mark.slurm
@pytest.mark.slow
def test_repeats_array_on_the_local_slurm_cluster(slurm_cluster, tiny_config, tmp_path):
    from tests.test_slurm_launch import submit, wait_until

    base = tmp_path / "array"
    res = submit("--nodes", 1, "--repeats", 2, "--time", 10, "--config", tiny_config, "--run-dir", base)
    assert res.returncode == 0, res.stdout
    ids = [jobs.read_record(base / f"repeat_{r}")["jobs"][0]["job_id"] for r in range(2)]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]

    def table() -> dict[str, status.RunStatus]:
        return {r.run: r for r in status.collect([base])}

    seen = table()  # both tasks listed at once, from squeue, before either has written a config
    assert sorted(seen) == ["repeat_0", "repeat_1"]
    assert {seen[f"repeat_{r}"].job_id for r in range(2)} == set(ids)
    assert all(r.slurm in jobs.ACTIVE_STATES or r.slurm == "COMPLETED" for r in seen.values()), seen
    # DONE is written by the job's last step, the job ends a moment later
    wait_until(lambda: all(r.done and r.slurm == "COMPLETED" for r in table().values()), "both repeats to finish")
    final = table()
    for r in range(2):
        row = final[f"repeat_{r}"]
        assert row.repeat == r and row.phase == "done" and row.epochs_done == 3 and row.eta_s == 0
    text = status.format_table(list(final.values()))
    assert f"({array}_0)" in text and f"({array}_1)" in text and text.endswith("2 runs, 2 done")
