"""The typed run config: YAML + overrides, validation users see, round trip, resume hash."""

import pytest

from masan.config import ConfigError, config_diff, config_hash, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.01\nmodel:\n  patch_grid: [2, 2, 2]\n")
    cfg = load_config(f, ["optim.lr=3e-4", "data.classes=[NC, AD]", "train.max_steps=5"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.patch_grid == [2, 2, 2]
    assert cfg.data.classes == ["NC", "AD"]
    assert cfg.train.max_steps == 5
    assert cfg.loss.alpha == 0.5 and cfg.loss.beta == 0.5  # the paper's defaults


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
