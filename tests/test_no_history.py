"""No history in code: comments, docstrings and messages say *why* in words.

A figure measured on one machine (``12 of 90 ms``, ``108 -> 83 ms``), a GPU or CPU model, a
date, a session or an issue number goes stale the day the code changes, and nobody reruns the
measurement to fix the comment. Those belong in docs/ (under a dated heading) and in commit
messages; the code states the reason and points there, e.g. ``(docs/performance.md, "Where
the step went")``. This test scans every Python file of masan/, launch/, data_tools/, bench/ and
experiments/; the comments and docstrings of masan/ and launch/ also for any measured size or
speed-up (:data:`MEASURED`).
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("masan", "launch", "data_tools", "bench", "experiments")

_NUM = r"\d+(?:\.\d+)?"
HISTORY = {
    "a GPU or CPU model (a measurement's machine)": re.compile(
        r"\b(?:[ABHV]100|H200|GH200|GB200|B200|A10G|A40|L40S?|MI[1-3]\d{2}X?|RTX ?\d{3,4}|TITAN|"
        r"EPYC|Xeon|Ryzen|Threadripper|Graviton)\b"),
    "a date": re.compile(r"\b(?:19|20)\d{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])\b"),
    "an issue or pull-request number": re.compile(
        r"\b(?:issues?|PR|pull request)\s*#?\d+\b|\bitem \d+ of issue\b|\(#\d+\)", re.IGNORECASE),
    "a session or device slot": re.compile(
        r"\b(?:this|that|the previous|an earlier|a later|second|third|fourth|fifth|\d+(?:st|nd|rd|th)) "
        r"(?:working |development |GPU |device )?session\b|\b(?:GPU|device|accelerator) slots?\b",
        re.IGNORECASE),
    "a measured before/after or share of a step": re.compile(
        rf"\b{_NUM} ?(?:ms|s|GiB|GB|MB)? ?(?:->|→) ?{_NUM} ?(?:ms|GiB)\b"
        rf"|\b{_NUM} (?:ms )?of (?:an? |the )?{_NUM} ?ms\b"),
    "the machine a figure was measured on": re.compile(
        r"\b(?:\d+-core|development|dev) (?:box|machine|VM)\b|\bthis box\b", re.IGNORECASE),
}
"""What history looks like in source text, by kind (the kind is named in the failure)."""

PROSE_SCANNED = ("masan", "launch")
"""Where comments and docstrings may state no measured figure at all (bench/ and experiments/
print their measurements; their prose is held to :data:`HISTORY` only)."""
MEASURED = re.compile(rf"\b{_NUM} ?(?:ms|[kKMGT]i?B)\b|\b{_NUM} ?x (?:faster|slower)\b")
"""A time, a size or a speed-up as a number: in prose it is a measurement (or depends on the
machine) and goes stale; the prose says why in words and points to docs/. What the program
prints is not prose (an f-string of computed values is not a comment), and neither is an
inline literal (````...````: code, or an example of the output)."""

ALLOWED: dict[tuple[str, str], str] = {
    ("masan/convert/nifti.py",
     "header, e.g. dims of 30000^3 in a 300 KB file, would otherwise end in a bare MemoryError)."):
        "an invented corrupt header illustrating the check (a size far below its shape's), not a measurement",
}
"""(path relative to the repository root, the stripped line) -> why it is not history and
cannot be reworded."""


def history_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, line) of each line of ``text`` that matches a :data:`HISTORY` pattern."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in HISTORY.items():
            if pattern.search(line):
                hits.append((n, kind, line.strip()))
                break
    return hits


def prose(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each comment and each docstring (a string standing as a statement:
    a module's, class's, function's or attribute's) of the Python source ``text``, inline
    literals blanked out (their line breaks kept, so line numbers stay right)."""
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    found += [(node.lineno, node.value.value) for node in ast.walk(ast.parse(text))
              if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str)]
    return [(line, re.sub(r"``.*?``", lambda m: "\n" * m.group().count("\n"), body, flags=re.DOTALL))
            for line, body in found]


def measured_lines(text: str) -> list[tuple[int, str]]:
    """(line number, source line) of each comment or docstring line of ``text`` holding a
    :data:`MEASURED` figure."""
    source = text.splitlines()
    hits = set()
    for first, body in prose(text):
        for offset, line in enumerate(body.splitlines()):
            if MEASURED.search(line):
                hits.add((first + offset, source[first + offset - 1].strip()))
    return sorted(hits)


def _not_allowed(tops, finder) -> list[str]:
    """``path:line: finding`` of every line ``finder(source)`` reports in the .py files under
    ``tops`` that ALLOWED does not list (``finder`` yields (line number, *what, line text))."""
    found = []
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, *what, line in finder(path.read_text(encoding="utf-8")):
                if (rel, line) not in ALLOWED:
                    found.append(": ".join([f"{rel}:{n}", *what, line]))
    return found


@pytest.mark.parametrize("tops, finder, rule", [
    (SCANNED, history_lines,
     "history in code (say why in words; put figures, machines, dates, sessions and issue numbers in docs/ under a "
     "dated heading and point there, e.g. (docs/performance.md, \"Where the step went\"); a line that is genuinely "
     "not history goes into ALLOWED with its reason)"),
    (PROSE_SCANNED, measured_lines,
     "a measured size, time or speed-up in a comment or docstring (say why in words and point to "
     "docs/performance.md or docs/architecture.md, which hold the figure; a size derived from shapes can be said "
     "as its formula)"),
], ids=["history", "measured figures in prose"])
def test_no_history_in_code(tops, finder, rule):
    found = _not_allowed(tops, finder)
    assert not found, f"{rule}:\n" + "\n".join(found)


def test_allowed_lines_still_exist():
    """An allow-list entry whose line is gone would silently allow it again elsewhere later."""
    for (rel, line), why in ALLOWED.items():
        assert why, f"{rel}: an ALLOWED entry needs its reason"
        assert line in (text.strip() for text in (ROOT / rel).read_text(encoding="utf-8").splitlines()), (
            f"{rel}: ALLOWED line no longer there, remove the entry: {line}")


def test_the_patterns_catch_history_and_pass_ordinary_text():
    history = [
        "max took a full-resolution step on an H100 from 108 to 83 ms",
        "the weight gradient took 153 ms of a 311 ms step",
        "those conversions were 14 of 90 ms of a step",
        "CUDA: 87 -> 83 ms and 7.9 -> 6.6 GiB per sample",
        "the same commit had passed on this machine (AMD EPYC)",
        "as they were before the slot of 2026-11-26",
        "both tools refuse the nesting (issue 12, item 7)",
        "Refuse a store inside a run directory (item 7 of issue 12)",
        "fixed upstream (#512)",
        "Without a GPU (third session): the layout kept",
        "measured in the second GPU slot",
        "cost 60 ms more per T1 (2-core box)",
    ]
    ordinary = [
        "timeout_ms: the lock's timeout in ms",
        'RepetitionTime is not a TR in seconds (BIDS: seconds, e.g. 0.8 for 800 ms)',
        "otherwise the first session (sorted) holding both modalities is used",
        'help="BIDS session to use (default: first with T1w and BOLD)"',
        "body{color:#222}",
        'ISSUE_ZERO_RESHAPE = "https://github.com/deepspeedai/DeepSpeed/issues/3810"',
        "train on this machine even if SLURM is available",
        "the pinned buffers of the next slot",
        "datetime.now().strftime('%Y-%m-%d')",
        "(N, C, D, H, W) -> (N, C, *size)",
        "data wait 1.2 s of 10.0 s (12.0% max over 2 ranks)",
        "a transpose would make every read slower (docs/data-format.md, \"Axis order\")",
    ]
    assert [line for line in history if not history_lines(line)] == []
    assert [hit for line in ordinary for hit in history_lines(line)] == []


def test_measured_figures_are_found_in_prose_only():
    source = '''"""Module: an import that takes ~1 s is fine, ``peak RSS 2.10 GiB`` is an example."""
import torch

LIMIT = 4 * 2**30
"""Most memory a pass may need: a few GiB fit on a training GPU."""


def f(need):
    """Reuse the buffers (a fresh 660 MB tensor per sample costs page faults)."""
    x = 1  # the taps are 1.2-1.7x faster than oneDNN's conv
    message = f"needs {need / 2**30:.1f} GiB, over the 4 GiB limit"
    # the (2, 64) patches of a 4x4x4 grid, one 1x1 conv
    return message, x


class C:
    size: int = 0
    """It is ~2.6 GB in bf16 at
    60x64x44 x 976 frames."""
'''
    assert [n for n, _ in measured_lines(source)] == [9, 10, 18]
