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


def sign_flip_test(diffs) -> float:
    """Two-sided p-value of mean(diffs) = 0 by the exact sign-flip (permutation) test.

    Under the null each pipeline seed's difference is as likely positive as negative, so the p-value is
    the share of the 2^n sign patterns whose mean is at least as far from zero as the observed one. It
    asks whether a lead would survive other tower seeds, which the bootstrap over sessions does not. With
    n seeds the smallest p-value is 2 / 2^n (0.25 at 3 seeds, 0.031 at 6).
    """
    diffs = np.asarray(diffs, np.float64)
    if diffs.ndim != 1 or not 1 <= diffs.size <= 20:
        raise ValueError(f"sign_flip_test takes 1 to 20 differences, got shape {diffs.shape}")
    patterns = 1 - 2 * ((np.arange(2 ** diffs.size)[:, None] >> np.arange(diffs.size)) & 1)  # [2^n, n] of +-1
    means = (patterns * diffs).mean(axis=1)
    return float(np.mean(np.abs(means) >= abs(diffs.mean()) - 1e-12))


def nested_table(runs_of: dict, cold_mask, reference: str = "tpad", num_resamples: int = 10000) -> dict:
    """Whole-pipeline seeds with several downstream seeds each: the rows' spread and two tests.

    Args:
      runs_of: {pipeline seed: [{model: int [num_examples] test ranks} per downstream seed]}, every run on
        the same test examples. A row is kept when every run ranked it.
      cold_mask: bool [num_examples], True where the target is cold.
      reference: the row every other row is tested against.
    Returns:
      {model: {column: cell}}, cell: "values" (per pipeline seed, the mean over its downstream seeds),
      "mean" and "std" over pipeline seeds (the towers' spread once the downstream's is averaged out),
      "within" (the mean over pipeline seeds of the std over downstream seeds), and against `reference`
      "diff" (points), "p" (paired bootstrap over test examples of the per-example metric averaged over
      every run), "seed_diffs" and "seed_p" (exact sign-flip test over pipeline seeds); None for the
      reference itself.
    """
    every_run = [run for runs in runs_of.values() for run in runs]
    pooled = seed_table(every_run, cold_mask, reference, num_resamples)  # the test over sessions
    sizes = np.cumsum([0] + [len(runs) for runs in runs_of.values()])  # each seed's runs in `every_run`
    table = {}
    for name, columns in pooled.items():
        table[name] = {}
        for column, cell in columns.items():
            groups = [cell["values"][a:b] for a, b in zip(sizes[:-1], sizes[1:])]
            per_seed = [float(np.mean(group)) for group in groups]
            table[name][column] = {
                "values": per_seed, "mean": float(np.mean(per_seed)),
                "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                "within": float(np.mean([np.std(g, ddof=1) if len(g) > 1 else 0.0 for g in groups])),
                "diff": cell["diff"], "p": cell["p"], "seed_diffs": None, "seed_p": None}
    for name, columns in table.items():
        for column, cell in columns.items():
            if cell["diff"] is not None:
                cell["seed_diffs"] = [a - b for a, b in zip(table[reference][column]["values"], cell["values"])]
                cell["seed_p"] = sign_flip_test(cell["seed_diffs"])
    return table


def nested_markdown(table: dict, runs_of: dict, reference: str = "tpad") -> str:
    """The nested seed table: per column mean +- std over pipeline seeds, the spread over downstream
    seeds within one, and for every other row reference's lead with both p-values."""
    columns = list(next(iter(table.values())))
    seeds = list(runs_of)
    downstream = sorted({len(runs) for runs in runs_of.values()})
    lines = [f"Pipeline seeds {', '.join(str(s) for s in seeds)}, each with "
             f"{' or '.join(str(n) for n in downstream)} downstream seeds: per column the mean +- std over "
             "pipeline seeds of each seed's downstream mean, in %, and (w) the std over downstream seeds "
             f"within a pipeline seed. In brackets: {reference} minus the row (points), p of a paired "
             "bootstrap over test sessions (every run averaged), and on how many pipeline seeds "
             f"{reference} leads with p of the exact sign-flip test over them; * marks p < "
             f"{SIGNIFICANCE_LEVEL}.", "", f"| model | {_header(columns)} |", "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        cells = []
        for cell in row.values():
            text = f"{cell['mean']:.2f} +- {cell['std']:.2f} (w {cell['within']:.2f})"
            if cell["p"] is not None:
                leads = sum(d > 0 for d in cell["seed_diffs"])
                text += (f" ({cell['diff']:+.2f}, p={cell['p']:.3f}{_mark(cell['p'])}; "
                         f"{leads}/{len(seeds)}, p={cell['seed_p']:.3f}{_mark(cell['seed_p'])})")
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mark(p: float) -> str:
    """The significance mark of a p-value in the tables."""
    return "*" if p < SIGNIFICANCE_LEVEL else ""


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
                text += f" ({cell['diff']:+.2f}, p={cell['p']:.3f}{_mark(cell['p'])})"
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
    lines = ([name, slice_name, metric, K, seed, f"{value:.2f}", _number(cell["diff"], 3), _number(cell["p"], 4)]
             for name, columns in table.items() for (slice_name, metric), cell in columns.items()
             for seed, value in zip(seeds, cell["values"]))
    base = _write_text_and_csv(results_dir, "pipeline_seeds", text, ["model", "slice", "metric", "k", "seed",
                                                                     "value", "diff_vs_reference", "p_value"], lines)
    plots.seed_bars(table, seeds, base + ".png")


def write_nested(table: dict, runs_of: dict, text: str, results_dir: str) -> None:
    """results_dir/pipeline_downstream_seeds.md (`text`) and .csv: one line per model, column and pipeline
    seed (its downstream mean and the number of downstream seeds), with the row's within-seed spread,
    its difference from the reference and both p-values."""
    lines = ([name, slice_name, metric, K, seed, len(runs), f"{value:.2f}", f"{cell['within']:.2f}",
              _number(cell["diff"], 3), _number(cell["p"], 4), _number(cell["seed_p"], 4)]
             for name, columns in table.items() for (slice_name, metric), cell in columns.items()
             for (seed, runs), value in zip(runs_of.items(), cell["values"]))
    _write_text_and_csv(results_dir, "pipeline_downstream_seeds", text,
                        ["model", "slice", "metric", "k", "seed", "downstream_seeds", "value", "within_std",
                         "diff_vs_reference", "p_sessions", "p_seeds"], lines)


def _number(value, digits: int) -> str:
    """A CSV cell: `value` with `digits` decimals, empty for None (the reference row has no test)."""
    return "" if value is None else f"{value:.{digits}f}"


def _write_text_and_csv(results_dir: str, name: str, text: str, header, lines) -> str:
    """Writes results_dir/<name>.md (`text`) and <name>.csv (`header`, then `lines`); returns the path
    without its extension."""
    os.makedirs(results_dir, exist_ok=True)
    base = os.path.join(results_dir, name)
    with atomic_open(base + ".md") as f:
        f.write(text)
    with atomic_open(base + ".csv", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    return base
