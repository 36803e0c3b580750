"""What makes two configs the same run: the keys a field flag marks (:func:`flagged_keys`), the
fingerprint a checkpoint is resumed under (:func:`config_hash`) and the readable differences
(:func:`config_diff`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

from masan.config.loading import config_to_dict
from masan.config.schema import HASHED_WHEN_SET, RESUMABLE, RunConfig, get_dotted


def flagged_keys(flag: str, cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys whose field carries the metadata ``flag`` (:data:`RESUMABLE`, :data:`SAME_METHOD`,
    :data:`HASHED_WHEN_SET`); a flagged section is one key (e.g. ``"checkpoint"``)."""
    cls = cls or RunConfig
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.metadata.get(flag):
            out.append(key)
        elif dataclasses.is_dataclass(hints[f.name]):
            out.extend(flagged_keys(flag, hints[f.name], key + "."))
    return tuple(out)


def _pop_dotted(tree: dict, dotted: str) -> Any:
    *path, last = dotted.split(".")
    for k in path:
        tree = tree[k]
    return tree.pop(last, None)


def config_hash(cfg: RunConfig) -> str:
    """Fingerprint of everything that must match for a checkpoint to be resumed.

    Paths, logging and checkpoint cadence, worker counts and epoch budgets may change
    between submissions (e.g. to extend a run); model, loss, optimiser, precision, split and
    data selection may not. Which keys may change is the :data:`RESUMABLE` metadata of the
    config fields.
    """
    d = config_to_dict(cfg)
    defaults = RunConfig()
    for dotted in flagged_keys(HASHED_WHEN_SET):
        if get_dotted(cfg, dotted) == get_dotted(defaults, dotted):
            _pop_dotted(d, dotted)
    for dotted in flagged_keys(RESUMABLE):
        _pop_dotted(d, dotted)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_diff(a: RunConfig, b: RunConfig, resumable: bool = True) -> list[str]:
    """Human-readable list of ``key: old -> new`` differences (for resume errors); without
    ``resumable``, only the keys a resume may not change (not :data:`RESUMABLE`)."""
    out: list[str] = []
    free = () if resumable else flagged_keys(RESUMABLE)

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y and not any(prefix == k or prefix.startswith(f"{k}.") for k in free):
            out.append(f"{prefix}: {x!r} -> {y!r}")

    walk(config_to_dict(a), config_to_dict(b), "")
    return out
