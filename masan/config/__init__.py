"""One typed run configuration: YAML file + ``key.sub=value`` CLI overrides.

Every knob of a run lives here; modules receive the section they need and never read
constants of their own. A run writes the resolved config as ``config.yaml`` in its run
directory (see :func:`save_config`), and :func:`config_hash` fingerprints the parts that
must match for a checkpoint to be resumed.

Example::

    cfg = load_config("hpc/configs/demo.yaml", ["optim.lr=3e-4", "model.fusion=add"])

Modules: :mod:`~masan.config.schema` (the sections, their fields and flags),
:mod:`~masan.config.loading` (YAML + overrides, command-line arguments, saving),
:mod:`~masan.config.validation` (values no run can use), :mod:`~masan.config.identity`
(flagged keys, :func:`config_hash`, :func:`config_diff`). Import the names from
``masan.config``: this package's API.
"""

from masan.config.identity import config_diff, config_hash, flagged_keys
from masan.config.loading import (
    add_config_arguments,
    add_override_arguments,
    config_from_args,
    config_from_dict,
    config_or_exit,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)
from masan.config.schema import (
    HASHED_WHEN_SET,
    PLUMBING,
    RESUMABLE,
    SAME_METHOD,
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
)
from masan.config.validation import unused_inputs, validate_config, validate_for_training

__all__ = [
    "HASHED_WHEN_SET", "PLUMBING", "RESUMABLE", "SAME_METHOD", "AugmentConfig", "CheckpointConfig", "ConfigError",
    "DataConfig", "LogConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "SplitConfig", "TrainConfig",
    "add_config_arguments", "add_override_arguments", "config_diff", "config_from_args", "config_from_dict",
    "config_hash", "config_or_exit", "config_to_dict",
    "flagged_keys", "load_config", "parse_override", "save_config", "unused_inputs", "validate_config",
    "validate_for_training",
]
