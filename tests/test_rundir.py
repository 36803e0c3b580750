"""masan.files (atomic writes), masan.rundir (the run directory's names, DONE) and the SLURM
resources' executor mapping: the small owners every other module relies on."""

import os
import stat
import subprocess
import sys
from dataclasses import fields

import pytest

from launch.slurm.plan import SUBMITIT, Resources
from masan.access import creation_umask
from masan.config import RunConfig, config_from_dict
from masan.files import atomic_write_json, atomic_write_text, atomic_writer
from masan.rundir import RunDir


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "new"  # a failed write keeps the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_atomic_write_follows_the_creation_umask(tmp_path):
    """Run directories and stores are never more open than their sources: the temporary file is
    created like open() would (umask), not 0o600 (mkstemp) nor wider."""
    with creation_umask(0o640):
        atomic_write_text(tmp_path / "group.txt", "x")
    with creation_umask(0o600):
        atomic_write_text(tmp_path / "owner.txt", "x")
    assert stat.S_IMODE((tmp_path / "group.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "owner.txt").stat().st_mode) == 0o600


def test_done_is_for_this_configs_target(tmp_path):
    run = RunDir(tmp_path)
    cfg = RunConfig(run_dir=str(tmp_path))
    assert run.finished(cfg) is None
    run.mark_done(cfg, step=7, epochs_done=3)
    assert run.finished(cfg)["step"] == 7
    longer = config_from_dict({"run_dir": str(tmp_path), "train": {"joint_epochs": cfg.train.joint_epochs + 1}})
    assert run.finished(longer) is None  # a longer target reopens the run
    run.done.write_text("{ half")
    assert run.finished(cfg) is None
    run.reopen()
    assert not run.done.exists() and os.fspath(run) == str(tmp_path)


@pytest.mark.parametrize("record", ["with its config", "before DONE kept the config"])
def test_a_finished_run_stays_finished_when_a_newer_version_fingerprints_its_settings_otherwise(tmp_path, record):
    """A setting made resumable drops out of every fingerprint: DONE then holds another hash for
    the same settings, and evaluate, predict and status must not call the run unfinished. A DONE
    written for other settings is still not this config's."""
    import json

    from masan.config import config_to_dict, save_config

    run = RunDir(tmp_path)
    cfg = RunConfig(run_dir=str(tmp_path))
    save_config(cfg, run.config)
    run.mark_done(cfg, step=7, epochs_done=sum(cfg.epochs.values()))
    done = json.loads(run.done.read_text())
    done["target"]["config_hash"] = "0123456789abcdef"  # what an older version's rules gave
    if record != "with its config":
        del done["config"]  # read from config.yaml then
    run.done.write_text(json.dumps(done))
    assert run.finished(cfg)["step"] == 7 and run.unfinished(cfg) is None
    other = config_from_dict({"run_dir": str(tmp_path), "model": {"dropout": 0.123}})
    assert run.finished(other) is None, "other settings: not this config's DONE"
    if record == "with its config":
        done["config"] = config_to_dict(other)
        run.done.write_text(json.dumps(done))
        assert run.finished(cfg) is None, "written for other settings"


def test_finished_needs_no_torch(tmp_path):
    """launch/submit.py asks it on a login node: importing torch there costs seconds."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from masan.config import RunConfig; from masan.rundir import RunDir; import launch.submit\n"
            f"print(RunDir({str(tmp_path)!r}).finished(RunConfig()))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "None", res.stderr


def test_every_resource_field_reaches_the_executor():
    """A new SLURM flag is a field with its submitit name; nothing else maps it."""
    res = Resources(nodes=2, gpus_per_node=4, cpus_per_task=8, mem="64G", time_min=90, partition="gpu",
                    account="a", qos="q", constraint="c", exclude="n1", job_name="j", signal_delay_s=60)
    params = res.executor_parameters()
    assert {f.metadata[SUBMITIT] for f in fields(Resources)} | {"ntasks_per_node"} == set(params)
    assert params["time"] == 90 and params["ntasks_per_node"] == 4
    cpu = Resources().executor_parameters()  # unset flags are left to SLURM, no --gpus-per-node=0
    assert "gpus_per_node" not in cpu and "qos" not in cpu and cpu["ntasks_per_node"] == 1
