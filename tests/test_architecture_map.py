"""docs/architecture.md's tree lists exactly the modules of the code, so a newcomer's map of the
house is the house."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("masan", "launch", "data_tools", "experiments", "bench")


def _listed() -> set[str]:
    text = (REPO / "docs/architecture.md").read_text()
    tree = text.split("## The tree", 1)[1].split("```", 2)[1]
    listed, root = set(), None
    for line in tree.splitlines():
        if re.fullmatch(r"[a-z_]+/", line):
            root = line
        elif line.startswith("  ") and root:
            listed.add(root + line.split()[0])
    return listed


def test_the_tree_in_the_architecture_doc_matches_the_code():
    modules = {str(p.relative_to(REPO)) for root in ROOTS for p in (REPO / root).rglob("*.py")
               if "__pycache__" not in p.parts}
    listed = _listed()
    assert not modules - listed, f"modules missing from docs/architecture.md's tree: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/architecture.md's tree lists absent modules: {sorted(listed - modules)}"
