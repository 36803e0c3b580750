"""What a start decides before it trains (masan.train.run.preflight, check_start, and the
checkpoint's checks): a split.json of a start that never trained follows the config, one a run
trained on refuses other split settings; a lowered epoch target is refused, not recorded as
finished; a refused resume lists only what must be restored; the login-node checks refuse the
engine settings a job would refuse."""

from __future__ import annotations

import json

import pytest

from masan.config import ConfigError, SplitConfig, config_diff, config_hash, config_to_dict, load_config
from masan.data.splits import make_split
from masan.train.checkpoint import MARKER, CheckpointManager, ResumeError, past_target
from masan.train.run import check_start, preflight


def _start(tiny_config, run_dir, *overrides):
    cfg = load_config(tiny_config, [f"run_dir={run_dir}", *overrides])
    return cfg, preflight(cfg, 1, CheckpointManager(run_dir, 3), config_hash(cfg))


def _mark_trained(run_dir, cfg, phase="pretrain", epoch=1, consumed=0) -> None:
    """A complete checkpoint (no files of its own: its manifest is what the start reads)."""
    folder = run_dir / "checkpoints" / "step_000003"
    folder.mkdir(parents=True)
    state = {"phase": phase, "epoch": epoch, "consumed": consumed, "step": 3, "phase_start": 0,
             "epochs_done": epoch, "config_hash": config_hash(cfg), "dp_world_size": 1}
    (folder / MARKER).write_text(json.dumps({"tag": folder.name, "step": 3, "files": {}, "state": state,
                                             "config": config_to_dict(cfg)}))


def test_a_split_of_a_start_that_never_trained_follows_the_config(tiny_config, tmp_path):
    run = tmp_path / "run"
    cfg, first = _start(tiny_config, run)
    first.split.save(run / "split.json")  # a start that crashed after saving its split
    _, again = _start(tiny_config, run, "split.repeat=2")
    assert again.split.repeat == 2 and again.split_is_new and again.split.test != first.split.test

    _mark_trained(run, cfg)  # now a run trained on the repeat-0 split: it keeps it, and says so
    _, kept = _start(tiny_config, run)
    assert kept.split == first.split and not kept.split_is_new
    with pytest.raises(ConfigError, match=r"split\.repeat: 0 -> 2.*the run has trained on it"):
        _start(tiny_config, run, "split.repeat=2")


def test_a_lowered_epoch_target_is_refused_not_recorded_as_finished(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.pretrain_epochs=2", "train.joint_epochs=5"])
    lower = load_config(tiny_config, ["train.pretrain_epochs=2", "train.joint_epochs=3"])
    joint = {"phase": "joint", "epoch": 3, "consumed": 4}  # 3 joint epochs done, the 4th begun
    assert "has trained 4 joint epoch(s), more than train.joint_epochs=3" in past_target(joint, cfg, lower)
    assert past_target({**joint, "consumed": 0}, cfg, lower) is None  # exactly at the new target: it ends there
    assert past_target(joint, cfg, cfg) is None
    more = load_config(tiny_config, ["train.pretrain_epochs=4", "train.joint_epochs=5"])
    assert "after 2 pretrain epochs" in past_target(joint, cfg, more)
    assert past_target({"phase": "pretrain", "epoch": 1, "consumed": 0}, cfg, more) is None  # still pretraining

    run = tmp_path / "run"
    _mark_trained(run, cfg, phase="joint", epoch=4)
    with pytest.raises(ResumeError, match="more than train.joint_epochs=3 now asks for; start it again with at"):
        CheckpointManager(run, 3).check_compatible("step_000003", lower, config_hash(lower))


def test_a_refused_resume_lists_only_what_must_be_restored(tiny_config):
    a = load_config(tiny_config)
    b = load_config(tiny_config, ["model.dropout=0.3", "train.max_steps=17", "data.num_workers=0"])
    assert [d.split(":")[0] for d in config_diff(a, b, resumable=False)] == ["model.dropout"]
    assert {d.split(":")[0] for d in config_diff(a, b)} >= {"model.dropout", "train.max_steps"}


@pytest.mark.parametrize("overrides", [["train.precision=fp16", "train.device=cpu"], ["train.precision=fp16"]])
def test_the_login_node_refuses_what_the_job_would(tiny_config, tmp_path, overrides):
    """fp16 on the CPU: refused before a job waits in the queue, when the job's device is known
    (a SLURM job without GPUs, or train.device); a device not known yet is left to the job."""
    cfg = load_config(tiny_config, [f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        check_start(cfg, 1, "cpu")
    check_start(cfg, 1, None)
    assert not (tmp_path / "run").exists()


def test_the_login_node_refuses_a_model_that_cannot_be_built(tiny_config, tmp_path):
    """Built on the meta device from the config resolved against the store: refused before a job
    waits in the queue (it used to crash in the job and be restarted)."""
    cfg = load_config(tiny_config, [f"run_dir={tmp_path / 'run'}", "model.fmri_time=temporal_conv",
                                    "model.temporal_kernel=100"])
    with pytest.raises(ConfigError, match="temporal_kernel"):
        check_start(cfg, 1, None)
    assert not (tmp_path / "run").exists()


def test_a_cache_the_node_cannot_hold_is_refused_before_the_run_directory_is_touched(tiny_config, tmp_path):
    """Found as the cache was built, after the start had written its first files, it broke the
    promise that a refused start leaves the run directory as it was."""
    from masan.data.cache import CacheConfigError

    run = tmp_path / "run"
    with pytest.raises(CacheConfigError, match=r"data.cache=host needs .* data.cache_reserve_gib=1000000.0"):
        _start(tiny_config, run, "data.cache=host", "data.cache_reserve_gib=1e6")
    assert not run.exists()
    _start(tiny_config, run, "data.cache=host", "data.cache_reserve_gib=0")


def test_a_config_no_training_should_start_with_is_refused_at_the_start_not_when_read(tiny_config, tmp_path):
    cfg = load_config(tiny_config, [f"run_dir={tmp_path / 'run'}", "loss.alpha=0"])  # a finished run may hold it
    with pytest.raises(ConfigError, match="loss.alpha=0.0 weighs the t1 autoencoder"):
        check_start(cfg, 1, None)
    assert not (tmp_path / "run").exists()


def test_training_monitors_the_validation_part_and_tests_on_the_test_part(monkeypatch):
    """The datasets a run trains, monitors and tests on are the split's train, val and test
    parts (never the test part for monitoring, never val subjects in training)."""
    from types import SimpleNamespace

    import masan.data.dataset as dataset
    from masan.train.run import _datasets

    monkeypatch.setattr(dataset, "CohortDataset", lambda store, part, labels, cfg: (list(part), list(labels)))
    subjects = [f"s{i:02d}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    split = make_split(subjects, labels, SplitConfig(val_fraction=0.2))
    train, val, test = _datasets(load_config(None, []), SimpleNamespace(subjects=subjects, labels=labels, split=split))
    label_of = dict(zip(subjects, labels))
    for got, part in ((train, split.train), (val, split.val), (test, split.test)):
        assert got == (part, [label_of[s] for s in part])
    no_val = make_split(subjects, labels, SplitConfig())
    assert _datasets(load_config(None, []), SimpleNamespace(subjects=subjects, labels=labels, split=no_val))[1] is None
