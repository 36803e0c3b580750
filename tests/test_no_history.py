"""No history in code: comments, docstrings and messages say *why* in words.

A figure measured on one machine (``12 of 90 ms``, ``108 -> 83 ms``), a GPU or CPU model, a
date, a session or an issue number goes stale the day the code changes, and nobody reruns the
measurement to fix the comment. Those belong in docs/ (under a dated heading) and in commit
messages; the code states the reason and points there, e.g. ``(docs/performance.md, "Where
the step went")``. This test scans every Python file of masan/, launch/, data_tools/, bench/ and
experiments/.
"""

import re
from pathlib import Path

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

ALLOWED: dict[tuple[str, str], str] = {}
"""(path relative to the repository root, the stripped line) -> why it is not history and
cannot be reworded. Empty: every hit so far could say its reason in words instead."""


def history_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, kind, line) of each line of ``text`` that matches a :data:`HISTORY` pattern."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in HISTORY.items():
            if pattern.search(line):
                hits.append((n, kind, line.strip()))
                break
    return hits


def test_no_history_in_code():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, kind, line in history_lines(path.read_text(encoding="utf-8")):
                if (rel, line) not in ALLOWED:
                    found.append(f"{rel}:{n}: {kind}: {line}")
    assert not found, (
        "history in code (say why in words; put figures, machines, dates, sessions and issue numbers in "
        "docs/ under a dated heading and point there, e.g. (docs/performance.md, \"Where the step went\"); "
        "a line that is genuinely not history goes into ALLOWED with its reason):\n" + "\n".join(found))


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
