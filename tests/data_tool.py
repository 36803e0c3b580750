"""A script of data_tools/ as a module, for in-process calls of its ``main`` (each interpreter
start costs seconds here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "data_tools"


def load_tool(name: str):
    """``data_tools/<name>.py`` imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
