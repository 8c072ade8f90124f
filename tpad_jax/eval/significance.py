"""Whole-pipeline seed tables with paired significance tests over test sessions.

A row that reads trained towers varies with the seed of everything that trained it (tower init and
batches, downstream init and batches). A claim that one row beats another therefore needs (a) its
spread over whole-pipeline seeds and (b) a test that the difference is not an accident of which test
sessions were drawn. Here (a) is mean +- standard deviation over seeds of each metric, and (b) a paired
bootstrap over test examples of the per-example metric averaged over seeds (averaging over seeds first
removes most of the seed noise from each example's value; resampling examples asks whether the mean
difference would survive another test set of the same size).
"""

import csv
import os

import numpy as np

from tpad_jax.eval import plots
from tpad_jax.workdir import atomic_open

# (slice, metric) columns of the seed table, all @20.
COLUMNS = (("all", "HR"), ("all", "MRR"), ("cold", "HR"))
K = 20
SIGNIFICANCE_LEVEL = 0.05


def per_example(ranks, metric: str, k: int = K) -> np.ndarray:
    """HR@k (0/1) or MRR@k (1/(rank+1) inside the cut-off) of every example from its 0-based rank."""
    ranks = np.asarray(ranks, np.float64)
    hit = ranks < k
    if metric == "HR":
        return hit.astype(np.float64)
    if metric == "MRR":
        return np.where(hit, 1.0 / (ranks + 1.0), 0.0)
    raise ValueError(f"metric must be HR or MRR, got {metric!r}")


def paired_bootstrap(a, b, num_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 by the paired bootstrap over examples.

    The bootstrap distribution of the mean difference is shifted to mean zero (the null) and the
    p-value is the share of resampled differences at least as far from zero as the observed one.
    """
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty vectors, got {diff.shape}")
    observed = diff.mean()
    rng = np.random.default_rng(seed)
    extreme, chunk = 0, max(1, 2_000_000 // diff.size)
    for start in range(0, num_resamples, chunk):
        size = min(chunk, num_resamples - start)
        means = diff[rng.integers(0, diff.size, (size, diff.size))].mean(axis=1)
        extreme += int(np.sum(np.abs(means - observed) >= abs(observed) - 1e-12))
    return extreme / num_resamples


def seed_table(runs: list[dict], cold_mask, reference: str = "tpad", num_resamples: int = 10000) -> dict:
    """Per row: mean, std and per-seed values of each column, and the paired test against `reference`.

    Args:
      runs: one {model: int [num_examples] test ranks} per seed, on the same test examples.
      cold_mask: bool [num_examples], True where the target is cold.
      reference: the row every other row is tested against.
    Returns:
      {model: {column: {"values", "mean", "std", "diff", "p"}}}: diff = reference - model (in points,
      on the seed-averaged per-example metric) and its p-value; None for the reference itself.
    """
    cold_mask = np.asarray(cold_mask, bool)
    names = [name for name in runs[0] if all(name in run for run in runs)]
    slices = {"all": np.ones_like(cold_mask), "cold": cold_mask}
    columns = [column for column in COLUMNS if slices[column[0]].any()]  # no cold targets: no cold column
    averaged = {(name, column): np.mean([per_example(run[name], column[1])[slices[column[0]]] for run in runs],
                                        axis=0) for name in names for column in columns}
    table = {}
    for name in names:
        table[name] = {}
        for column in columns:
            selected = slices[column[0]]
            values = [100.0 * per_example(run[name], column[1])[selected].mean() for run in runs]
            cell = {"values": values, "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "diff": None, "p": None}
            if name != reference and reference in names:
                ours, theirs = averaged[(reference, column)], averaged[(name, column)]
                cell["diff"] = 100.0 * float(np.mean(ours - theirs))
                cell["p"] = paired_bootstrap(ours, theirs, num_resamples)
            table[name][column] = cell
    return table


def markdown(table: dict, seeds, reference: str = "tpad") -> str:
    """The seed table: mean +- std per column and, for every other row, reference's lead and its p."""
    columns = list(next(iter(table.values())))
    header = _header(columns)
    lines = [f"Whole-pipeline seeds {', '.join(str(s) for s in seeds)}: mean +- std over seeds, in %. "
             f"In brackets: {reference} minus the row (points) and the p-value of a paired bootstrap over "
             f"test sessions; * marks p < {SIGNIFICANCE_LEVEL}.", "",
             f"| model | {header} |", "|---|" + "---:|" * len(columns)]
    for name, columns in table.items():
        cells = []
        for cell in columns.values():
            text = f"{cell['mean']:.2f} +- {cell['std']:.2f}"
            if cell["p"] is not None:
                mark = "*" if cell["p"] < SIGNIFICANCE_LEVEL else ""
                text += f" ({cell['diff']:+.2f}, p={cell['p']:.3f}{mark})"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(columns) -> str:
    """The column titles of (slice, metric) columns: "HR@20 | MRR@20 | HR@20 cold"."""
    return " | ".join(f"{metric}@{K}{' cold' if slice_name == 'cold' else ''}" for slice_name, metric in columns)


def probe_markdown(runs: list[list[dict]], seeds) -> str:
    """The retrieval probe of every export (rank by e_K cosine to the last click; each seed's
    results/probe.json, rows of model, slice, metric, k, value) as mean +- std over the seeds of the
    table's columns. A probe row missing from any seed is left out. No paired test: the probe keeps
    its averages, not per-session ranks."""
    values = {}
    for rows in runs:
        for row in rows:
            column = (row["slice"], row["metric"])
            if row["k"] == K and column in COLUMNS:
                values.setdefault(row["model"], {}).setdefault(column, []).append(float(row["value"]))
    header = _header(COLUMNS)
    lines = [f"Retrieval probe of each export (e_K cosine to the last click), seeds "
             f"{', '.join(str(s) for s in seeds)}: mean +- std, in %.", "",
             f"| export | {header} |", "|---|" + "---:|" * len(COLUMNS)]
    for name, columns in values.items():
        if all(len(columns.get(column, ())) == len(runs) for column in COLUMNS):
            spread = [np.std(columns[c], ddof=1) if len(runs) > 1 else 0.0 for c in COLUMNS]
            cells = [f"{np.mean(columns[c]):.2f} +- {std:.2f}" for c, std in zip(COLUMNS, spread)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fusion_markdown(chosen_of: dict, seeds, metric: str) -> str:
    """The kNN fusion weight each row chose per seed on validation `metric` ({seed: {row: weight}},
    `msbr.knn_fusion`), a line; a row that lacks a weight in some seed shows "–" there."""
    names = list(dict.fromkeys(name for chosen in chosen_of.values() for name in chosen))
    cells = [f"{name} " + ", ".join(f"{chosen_of[seed][name]:g}" if name in chosen_of.get(seed, {}) else "–"
                                     for seed in seeds) for name in names]
    return (f"kNN fusion weight chosen on validation {metric} (msbr.knn_fusion), seeds "
            f"{', '.join(str(s) for s in seeds)}: " + "; ".join(cells) + ".\n")


def write_table(table: dict, seeds, text: str, results_dir: str) -> None:
    """results_dir/pipeline_seeds.md (`text`), .csv (one line per model, column and seed, plus p) and .png
    (mean +- std bars, significant rows marked)."""
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, "pipeline_seeds")
    with atomic_open(base + ".md") as f:
        f.write(text)
    with atomic_open(base + ".csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "slice", "metric", "k", "seed", "value", "diff_vs_reference", "p_value"])
        for name, columns in table.items():
            for (slice_name, metric), cell in columns.items():
                extra = ["" if cell["diff"] is None else f"{cell['diff']:.3f}",
                         "" if cell["p"] is None else f"{cell['p']:.4f}"]
                writer.writerows([name, slice_name, metric, K, seed, f"{value:.2f}", *extra]
                                 for seed, value in zip(seeds, cell["values"]))
    plots.seed_bars(table, seeds, base + ".png")
