"""The typed run config: YAML + overrides, validation users see, round trip, resume hash."""

import re

import pytest

from masan.config import ConfigError, config_diff, config_hash, config_to_dict, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\nmodel:\n  patch_grid: [2, 2, 2]\n")
    cfg = load_config(f, ["optim.lr=3e-4", "data.classes=[NC, AD]", "train.max_steps=5"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.patch_grid == [2, 2, 2]
    assert cfg.data.classes == ["NC", "AD"]
    assert cfg.train.max_steps == 5
    assert cfg.loss.alpha == 0.5 and cfg.loss.beta == 0.5  # the paper's defaults


@pytest.mark.parametrize("change, shown", [("data.positive_class=NC", "data.positive_class: 'AD' -> 'NC'"),
                                           ("data.decision=expected_stage",
                                            "data.decision: 'argmax' -> 'expected_stage'")])
def test_a_checkpoint_resumes_under_settings_made_resumable_since_it_was_written(tmp_path, change, shown):
    """data.positive_class and data.decision change only how the outputs are called and scored: a
    resume may change them, also for a checkpoint whose fingerprint was taken when they still
    counted (the saved config is fingerprinted again under today's rules), and says what changed;
    a setting that still counts is refused."""
    import json

    from masan.train.checkpoint import MARKER, CheckpointManager, ResumeError

    binary = ["data.classes=[NC,AD]"]
    saved = load_config(None, binary)
    assert config_hash(saved) == config_hash(load_config(None, [*binary, change]))
    ckpt = CheckpointManager(tmp_path, keep=1)
    (ckpt.dir / "step_000001").mkdir(parents=True)
    state = {"config_hash": "written-before", "phase": "pretrain", "epoch": 0, "consumed": 1}
    manifest = {"state": state, "config": json.loads(json.dumps(config_to_dict(saved)))}
    (ckpt.dir / "step_000001" / MARKER).write_text(json.dumps(manifest))
    now = load_config(None, [*binary, change])
    assert ckpt.check_compatible("step_000001", now, config_hash(now)) == [shown]
    other = load_config(None, [*binary, "optim.lr=0.5"])
    with pytest.raises(ResumeError, match="optim.lr: 0.001 -> 0.5"):
        ckpt.check_compatible("step_000001", other, config_hash(other))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.fusoin=add", "unknown config key(s) model.fusoin"),
        ("model.fusion=mul", "not one of ['attention', 'add']"),
        ("optim.lr=fast", "expected a number"),
        ("model.patch_grid=4", "expected a list"),
        ("optim.lr", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder, not a config file; pass an existing"):
        load_config(tmp_path)  # e.g. the run directory instead of its config.yaml


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.fusion=add", "run_dir=/x/y"])
    p = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(p) == cfg


def test_hash_ignores_paths_and_cadence_but_not_science():
    base = load_config(None)
    moved = load_config(None, ["run_dir=/elsewhere", "checkpoint.every_steps=7", "data.num_workers=0"])
    assert config_hash(base) == config_hash(moved)
    changed = load_config(None, ["optim.lr=0.5"])
    assert config_hash(base) != config_hash(changed)
    assert config_diff(base, changed) == ["optim.lr: 0.001 -> 0.5"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=.nan", "optim.lr=nan is not a finite number"),
        ("optim.lr=0", "optim.lr=0.0 is out of range; use a positive learning rate"),
        ("optim.betas=[0.9, 1.5]", "optim.betas=[0.9, 1.5] is out of range"),
        ("split.test_fraction=1.5", "split.test_fraction=1.5 is out of range; use a fraction strictly between 0 and 1"),
        ("split.val_fraction=-0.1", "split.val_fraction=-0.1 is out of range"),
        ("train.joint_epochs=-1", "train.joint_epochs=-1 is out of range; use at least 1 epoch"),
        ("train.pretrain_epochs=-2", "train.pretrain_epochs=-2 is out of range"),
        ("optim.micro_batch=0", "optim.micro_batch=0 is out of range"),
        ("checkpoint.keep=0", "checkpoint.keep=0 is out of range"),
        ("train.dist_timeout_minutes=.inf", "train.dist_timeout_minutes=inf is not a finite number"),
        ("model.dropout=1", "model.dropout=1.0 is out of range"),
        ("data.classes=[AD]", "data.classes=['AD'] is out of range; use at least two distinct classes"),
        ("data.classes=[NC, NC]", "data.classes=['NC', 'NC'] is out of range; use at least two distinct"),
        ("data.classes=[CN,Dementia]", "data.positive_class='AD' is not one of data.classes=['CN', 'Dementia']"),
    ],
)
def test_wrong_values_are_refused_when_the_config_loads(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "hpc" / "configs").glob("*.yaml")):
        load_config(path)


def test_an_error_names_where_it_comes_from(tmp_path):
    """A bad override is the command line's, not the file's; a bad file is the file's."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("optim:\n  lr: 0.001\n")
    bad.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"\(from the overrides optim.lr=-2\)$"):
        load_config(good, ["optim.lr=-2"])
    with pytest.raises(ConfigError, match=r"\(in .*bad.yaml\)$"):
        load_config(bad, ["optim.micro_batch=2"])
    assert load_config(bad, ["optim.lr=0.01"]).optim.lr == 0.01  # the override fixes the file


def test_overrides_come_bare_or_after_set_in_every_launcher():
    """``--set KEY=VALUE`` (the bench tools' spelling) and bare ``KEY=VALUE`` words give one list
    of overrides, in the order given, in every command that takes a config."""
    import argparse

    from launch import submit, train_local
    from masan.config import add_config_arguments

    shared = argparse.ArgumentParser()
    add_config_arguments(shared)
    argv = ["--set", "optim.lr=1e-3", "seed=3", "--config", "c.yaml", "train.max_steps=4"]
    assert shared.parse_args(argv).overrides == ["optim.lr=1e-3", "seed=3", "train.max_steps=4"]
    assert shared.parse_args([]).overrides == []
    assert train_local.parse_args([*argv, "--nproc", "2", "--set", "log.every_steps=1"]).overrides == \
        ["optim.lr=1e-3", "seed=3", "log.every_steps=1", "train.max_steps=4"]
    assert submit.build_parser().parse_intermixed_args(["--local", *argv]).overrides == \
        ["optim.lr=1e-3", "seed=3", "train.max_steps=4"]
    assert load_config(None, shared.parse_args(argv[:3]).overrides).optim.lr == 1e-3


@pytest.mark.parametrize(("text", "fragment"), [
    ("optim:\n  lr: 0.1\nmodel:\n  dropout: 0.2\noptim:\n  lr: 0.3\n", "the key 'optim' is given twice in one section"),
    ("optim:\n  lr: 0.1\n  lr: 0.3\n", "the key 'lr' is given twice"),
    ("# nothing set\n", "holds no settings (it is empty, or comments only); leave --config out"),
    ("optim:\n  lr: [1\n", 'in "{path}", line'),
])
def test_a_config_file_that_would_be_read_otherwise_than_written_is_refused(tmp_path, text, fragment):
    """YAML keeps the last of two equal keys, and an empty file is the defaults: both silently.
    A syntax error names the file, not "<unicode string>"."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment.format(path=path))):
        load_config(path)


def test_yaml_merge_keys_still_work_and_explicit_keys_beside_them_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  <<: {groups: 4, dropout: 0.1}\n  dropout: 0.2\n  channels: [8, 16, 32, 32]\n")
    cfg = load_config(path)
    assert (cfg.model.groups, cfg.model.dropout) == (4, 0.2)
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="unhashable key"):
        load_config(path)


def test_a_home_folder_tilde_is_expanded_in_paths_a_shell_leaves_it_in():
    """`data.store=~/x` and `--out=~/x` reach the tools with '~' (no shell expands it there), and
    a folder named '~' was made in the current one: `rm -rf ~` is then one step away."""
    from pathlib import Path

    from data_tools import to_zarr
    from masan.config import load_config

    home = Path.home()
    cfg = load_config(None, ["data.store=~/c.zarr", "run_dir=~/runs/a", "data.cache_dir=~/shm"])
    assert (cfg.data.store, cfg.run_dir, cfg.data.cache_dir) == (f"{home}/c.zarr", f"{home}/runs/a", f"{home}/shm")
    args = to_zarr.parse_args(["--bids=~/bids", "--out=~/s.zarr"])
    assert (args.bids, args.out) == (home / "bids", home / "s.zarr")


@pytest.mark.parametrize("override, hint", [("model.t1_shape=None", "write null for no value"),
                                            ("train.max_steps=None", "write null for no value"),
                                            ("model.t1_shape=(32,32,32)", "write it as [32,32,32]")])
def test_the_hint_for_a_value_of_another_language_is_one_that_works(override, hint):
    """'None' and '(32,32,32)' are Python: the hint said to write [None] and [(32,32,32)], which fail too."""
    from masan.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(hint)):
        load_config(None, [override])
    fixed = override.split("=")[0] + "=" + ("null" if "null" in hint else "[32,32,32]")
    load_config(None, [fixed])
