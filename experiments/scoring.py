"""The science experiment's scores: where a run (or a fitted row) puts the planted regions, a
run's test metrics, and how they are printed: a line per run, one markdown table over repeats."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from experiments.baselines import metric_values
from masan.config import load_config
from masan.rundir import RunDir

TOP_K = 3
COLUMNS = (("4-class acc", "accuracy", 2), ("AD acc", "binary_accuracy", 2), ("AD precision", "precision", 2),
           ("AD recall", "recall", 2), ("AD AUC", "auc", 2), ("planted rank", "best_rank", 1))
"""Table columns: header, result key, decimals."""
RULES = {"argmax": "arg-max", "expected_stage": "stage"}
"""How the table names each decision rule (masan.predictions.decide)."""
PAIRED = (("4-class acc", "accuracy"), ("AD acc", "binary_accuracy"), ("AD AUC", "auc"))
"""Columns of the paired comparison: header, result key."""


def planted_regions(store, grid: list[int]) -> dict:
    """The regions holding planted T1 voxels on ``grid``: all of them (most planted voxels
    first) and per structure."""
    from masan.evaluate.oracle import planted_masks, planted_region_ranks
    from masan.synth.structures import region_ranks

    effect = store.attrs["planted_effect"]
    subject = store.subjects[0]
    shape, affine = store.shape(subject, "t1"), store.affine(subject, "t1")
    per = {name: region_ranks(mask, grid) for name, mask in planted_masks(effect, shape, affine).items()}
    return {"all": planted_region_ranks(effect, shape, affine, grid), "by_structure": per}


def region_result(region_weights: np.ndarray, labels: np.ndarray, planted: dict) -> dict:
    """Where the planted regions sit in the model's ranking (mean weight over the test subjects)."""
    from masan.evaluate.region_ranking import rank_regions

    if region_weights.size == 0 or not planted["all"]:
        return {"best_rank": None, "top3": None}
    order = [r for r, _ in rank_regions(region_weights, labels)]
    rank = {r: i + 1 for i, r in enumerate(order)}
    by_structure = {s: min((rank[r] for r in regions), default=None) for s, regions in planted["by_structure"].items()}
    best = min(rank[r] for r in planted["all"])
    return {"best_rank": best, "top3": best <= TOP_K, "rank_by_structure": by_structure,
            "model_top": order[:TOP_K]}


def score_run(run_dir: Path, planted: dict) -> dict:
    from masan.predictions import load_predictions

    cfg = load_config(RunDir(run_dir).config)
    preds, names = load_predictions(run_dir, "test")
    out = metric_values(preds.labels, preds.probs, names, cfg.data.positive_class, preds.decision)
    return {**out, **region_result(preds.region_weights, preds.labels, planted)}


def cell(values: list, digits: int = 2) -> str:
    """"mean ± std" (sample std) of the values that are not None; one value alone; "-" for none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def signed(values: list[float], digits: int = 2) -> str:
    """A difference's cell: "+mean ± std" (sample std), one value alone with its sign."""
    mean = statistics.mean(values)
    mean = 0.0 if abs(mean) < 0.5 * 10**-digits else mean  # no "-0.00"
    if len(values) == 1:
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_line(name: str, repeat: int, r: dict) -> str:
    if r.get("status") == "failed":
        where = f" after {r['minutes']:.1f} min (see {r['log']})" if "log" in r else ""
        return f"{name:<11} r{repeat}: FAILED{where}"
    where = ""
    if r.get("best_rank") is not None:
        ranks = ", ".join(f"{s} {k}" for s, k in r["rank_by_structure"].items())
        where = f"  planted best rank {r['best_rank']} (top{TOP_K}: {'yes' if r['top3'] else 'no'}; {ranks})"
    chosen = ""
    if "chosen" in r:
        ks = ", ".join(f"{block} {k}" for block, k in r["chosen"]["k"].items())
        chosen = f"  (k {ks}; C {r['chosen']['C']})"
    mins = f"  {r['minutes']:.1f} min" + (" (cached)" if r.get("status") == "cached" else "") if "minutes" in r else ""
    rule = f"  ({RULES[r['decision']]})" if "decision" in r else ""
    # None: undefined (masan.metrics), e.g. an AUC with one class in the test part
    p, rec, auc = ("-" if r[k] is None else f"{r[k]:.2f}" for k in ("precision", "recall", "auc"))
    return (f"{name:<11} r{repeat}: acc {r['accuracy']:.2f}  AD acc {r['binary_accuracy']:.2f}  "
            f"P {p}  R {rec}  AUC {auc}{rule}{where}{chosen}{mins}")


def rules(runs: list[dict]) -> str:
    """The decision rules of ``runs``: "stage" when all used it, "arg-max 2, stage 1" when they differ."""
    used = [RULES[r["decision"]] for r in runs if "decision" in r]
    if len(set(used)) <= 1:
        return used[0] if used else "-"
    return ", ".join(f"{name} {used.count(name)}" for name in RULES.values() if name in used)


def table(rows: dict[str, list[dict]], baselines: list[dict], minutes: float, header: str) -> str:
    """The markdown table: one line per row of ``rows`` (name -> its repeats' results, repeat
    0 first; "called by": each run's decision rule, the fitted rows' chosen inside their training
    parts), the chance baselines under it."""
    head = ["model", *(c for c, _, _ in COLUMNS), f"top-{TOP_K} hits", "called by", "runs ok", "min/run"]
    out = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        ok = [r for r in runs if r.get("status") != "failed"]
        cells = [cell([r.get(k) for r in ok], d) for _, k, d in COLUMNS]
        hits = [r["top3"] for r in ok if r.get("top3") is not None]
        top = f"{sum(hits)}/{len(hits)}" if hits else "-"
        mins = cell([r["minutes"] for r in runs if "minutes" in r], 1)
        out.append("| " + " | ".join([name, *cells, top, rules(ok), f"{len(ok)}/{len(runs)}", mins]) + " |")
    if baselines:
        maj, pos = baselines[0]["majority_class"], baselines[0]["positive_class"]
        out += ["", f"Chance: always-{maj} 4-class acc {cell([b['majority_accuracy'] for b in baselines])}; "
                    f"never-{pos} {pos}-vs-rest acc {cell([b['never_positive_accuracy'] for b in baselines])} "
                    "(precision 0, recall 0, AUC 0.5)."]
    out += [f"Took {minutes:.1f} min."]
    return "\n".join(out) + "\n"



def paired(rows: dict[str, list[dict]], main: str) -> str:
    """``main`` against every other row, split by split (the same training and test subjects):
    the mean ± std of main's score minus the row's, and on how many splits main scored higher /
    the same / lower. Differences of one split cancel what the split itself makes easy or hard,
    which the table's spreads over splits do not; rows that are a subset of main's own runs
    (``"<main> (first k)"``) are left out."""
    ours = rows.get(main, [])
    lines = [f"Paired by split (the same test subjects): {main} minus each row, mean ± std over the splits both "
             f"ran, and splits {main} higher / same / lower.", "",
             "| row | splits | " + " | ".join(h for h, _ in PAIRED) + " |", "|" + "---|" * (2 + len(PAIRED))]
    for name, runs in rows.items():
        if name == main or name.startswith(f"{main} ("):
            continue
        cells, splits = [], 0
        for _, key in PAIRED:
            diffs = [a[key] - b[key] for a, b in zip(ours, runs)
                     if "failed" not in (a.get("status"), b.get("status")) and None not in (a.get(key), b.get(key))]
            splits = max(splits, len(diffs))
            wins = (sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs))
            cells.append(f"{signed(diffs)} ({'/'.join(map(str, wins))})" if diffs else "-")
        lines.append(f"| {name} | {splits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
