"""Loading a config: a YAML file plus ``section.key=value`` overrides, checked field by field
against the schema's types, validated; the shared command-line arguments; saving it back."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from masan.config.schema import ConfigError, RunConfig
from masan.config.validation import validate_config
from masan.files import atomic_write_text


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML value against a dataclass field type; raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if type(None) in args and isinstance(value, str) and value.strip().lower() == "none":
            raise ConfigError(f"{where}: {value!r} is text to YAML; write null for no value")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}{_as_list_hint(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _as_list_hint(value: Any) -> str:
    """``"; write it as [NC,AD]"`` for ``"NC,AD"``: the brackets make YAML (file or override)
    read a list; empty where brackets would not help (true/false, a mapping, nothing)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    items = [item for item in re.split(r"[,\s()\[\]]+", str(value)) if item]
    return f"; write it as [{','.join(items)}]" if items else ""


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return key.strip(), value


def config_from_dict(values: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a RunConfig from a nested dict plus dotted overrides (validated)."""
    tree = json.loads(json.dumps(values or {}))  # deep copy, plain types
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(tree, k, v)
    cfg = _build(RunConfig, tree)
    # '~' reaches here unexpanded: a shell leaves it in `data.store=~/x` (no assignment) and in YAML
    cfg.run_dir, cfg.data.store, cfg.data.cache_dir = (
        os.path.expanduser(p) for p in (cfg.run_dir, cfg.data.store, cfg.data.cache_dir))
    validate_config(cfg)
    return cfg


MERGE_TAG = "tag:yaml.org,2002:merge"
"""YAML's merge key ``<<``."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: YAML keeps the last one
    silently, so a setting changed in one place and left in another would be ignored."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *anchor` may repeat; the explicit keys beside it win
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: YAML's own constructor says so
                break
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice in one "
                                                        "section; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML config file (None: defaults) and apply ``key.sub=value`` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = "is a folder, not a config file" if p.is_dir() else "does not exist"
            raise ConfigError(f"config file {p} {what}; pass an existing YAML file (see hpc/configs/)")
        try:
            with open(p) as f:  # from the file: YAML's errors then name it
                values = yaml.load(f, Loader=UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if values is None:
            raise ConfigError(f"config file {p} holds no settings (it is empty, or comments only); leave --config "
                              "out to use the built-in defaults, or write the settings to change into it")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (data:, model:, ...)")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{e}{_source_of(e, values, path, overrides)}") from None


def _source_of(error: ConfigError, values: dict, path: str | os.PathLike | None, overrides) -> str:
    """Where a config error comes from, for its message: the file when the file alone gives the
    same error, else the command-line overrides."""
    if not overrides:
        return f" (in {path})" if path else ""
    try:
        config_from_dict(values, [])
    except ConfigError as alone:
        if str(alone) == str(error):
            return f" (in {path})" if path else ""
    return f" (from the overrides {' '.join(overrides)})"


class OverrideList(argparse.Action):
    """Collects config overrides into one list, from bare ``KEY=VALUE`` words and from ``--set
    KEY=VALUE`` (the bench tools' spelling); a positional ``nargs="*"`` would otherwise replace
    what ``--set`` collected. Each spelling keeps its order; the launchers parse options first
    (``parse_intermixed_args``), so for a key given both ways the bare word wins."""

    def __call__(self, _parser, namespace, values, _option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def add_override_arguments(parser, help_text: str = "config overrides section.key=value, e.g. optim.lr=3e-4 "
                           "model.fusion=add (keys: masan/config/schema.py)") -> None:
    """Give an argparse parser the config overrides: bare ``KEY=VALUE`` words and ``--set KEY=VALUE``
    (repeatable), both into ``args.overrides``."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", action=OverrideList, default=[], help=help_text)
    parser.add_argument("--set", dest="overrides", nargs="+", metavar="KEY=VALUE", action=OverrideList,
                        default=argparse.SUPPRESS, help="the same overrides, spelled as the bench tools take them")


def add_config_arguments(parser) -> None:
    """Give an argparse parser the config arguments every command shares: --config and KEY=VALUE."""
    parser.add_argument("--config", metavar="YAML",
                        help="run config file (see hpc/configs/*.yaml); the built-in defaults when omitted")
    add_override_arguments(parser)


def config_or_exit(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                   defaults: list[str] | tuple[str, ...] = (), defaults_name: str = "the tool's own settings"
                   ) -> RunConfig:
    """The config file ``path`` (None: the built-in defaults) with the user's ``overrides``, on
    top of a tool's own ``defaults`` (the user's overrides win), for a command line. A bad file
    or override prints the reason, naming only what the user gave, and exits with status 2;
    ``defaults_name`` says what ``defaults`` are when the user's config is valid alone but not
    with them."""
    try:
        cfg = load_config(path, overrides)
        if not defaults:
            return cfg
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return config_from_dict(config_to_dict(cfg), [*defaults, *overrides])
    except ConfigError as e:
        given = " ".join([*([f"--config {path}"] if path else []), *overrides]) or "the built-in config"
        print(f"error: {e} ({given}, on {defaults_name})", file=sys.stderr)
        raise SystemExit(2) from None


def config_from_args(args) -> RunConfig:
    """The config named by :func:`add_config_arguments`' arguments (:func:`config_or_exit`)."""
    return config_or_exit(args.config, args.overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML atomically (:mod:`masan.files`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
