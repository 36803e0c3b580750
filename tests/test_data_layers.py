"""The data packages import one way (store <- convert <- qc, synth; data over store and convert),
the conversion side never imports torch (conversion workers and the data tools start
without it), and no masan module imports itself through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {"store": set(), "convert": {"store"}, "qc": {"store", "convert"}, "synth": {"store", "convert"},
           "data": {"store", "convert"}}
"""Package -> the data packages it may import (lazy imports inside functions included)."""
TORCH_FREE = ("store", "convert", "qc", "synth")


def test_data_packages_import_one_way():
    bad = {}
    for module, targets in _module_graph().items():
        pkg = "".join(module.split(".")[1:2])
        if pkg not in ALLOWED:
            continue
        up = {"".join(t.split(".")[1:2]) for t in targets} & ALLOWED.keys() - ALLOWED[pkg] - {pkg}
        if up:
            bad[module] = sorted(up)
    assert not bad, f"imports against the layers (docs/architecture.md): {bad}"


def test_conversion_side_imports_no_torch():
    modules = [f"masan.{pkg}.{p.stem}" for pkg in TORCH_FREE for p in sorted((REPO / "masan" / pkg).glob("*.py"))
               if p.stem != "__init__"]
    code = (f"import {', '.join(modules)}\n"
            "import sys\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]


def _module_graph() -> dict[str, set[str]]:
    """masan module -> the masan modules it imports (any import: lazy, type-only, re-export)."""
    modules = {}
    for path in (REPO / "masan").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.startswith("masan")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("masan"):
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = targets - {None, name}
    return graph


def test_no_import_circle_in_masan():
    """No module reaches itself through imports, type-only ones included: a circle is two ideas
    that should be one module, or one that should be split (docs/architecture.md)."""
    graph = _module_graph()
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, "import circles:\n" + "\n".join(sorted(circles)[:10])


def test_the_data_side_imports_nothing_above_it():
    """Data comes before the model in the data path: store, convert, qc, synth and data import
    none of model, train, inference, predict or evaluate (the batch keys live in masan.batch)."""
    above = {"model", "train", "inference", "predict", "predictions", "evaluate"}
    graph = _module_graph()
    bad = {m: sorted(t for t in targets if t.split(".")[1] in above)
           for m, targets in graph.items() if m.split(".")[1:2] and m.split(".")[1] in ALLOWED}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"imports up a layer (docs/architecture.md): {bad}"
