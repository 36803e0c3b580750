"""environment.yml (cluster route) must list the same dependencies as pyproject.toml."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(req: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = dict(_normalise(r) for r in project["dependencies"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_lists, "environment.yml has no pip: section"
    have = dict(_normalise(r) for r in pip_lists[0])
    assert have == want, (
        "environment.yml and pyproject.toml disagree; edit both. "
        f"only in pyproject: {sorted(set(want.items()) - set(have.items()))}; "
        f"only in environment.yml: {sorted(set(have.items()) - set(want.items()))}"
    )
