"""The results report: results.csv (long format), results.md (tables, each neural row's training epochs
and the rows skipped, with why), skipped.json, bar charts and training curves."""

import csv
import json
import os

import numpy as np

from tpad_jax import layout
from tpad_jax.cli import UserError
from tpad_jax.data import raw
from tpad_jax.eval import plots
from tpad_jax.workdir import atomic_open

CSV_FIELDS = ("model", "slice", "metric", "k", "value")
TABLE_SLICES = ("all", "cold", "warm")
METRICS = ("HR", "MRR", "NDCG")
TABLE_COLUMNS = tuple((metric, k) for metric in METRICS for k in (5, 10, 20))
PLOTTED = (("HR", 20), ("MRR", 20))
NOT_RANKED = ("oracle",)  # an upper bound, not a competitor: never marked best
SKIPPED_FILE = "skipped.json"


def read_results(path: str) -> list[dict]:
    """Rows of a results.csv as dicts with `k` int and `value` float.

    Raises:
      UserError naming the file, line and field of the first malformed entry.
    """
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_FIELDS:
            raise UserError(f"{path}:1: header {header} is not {','.join(CSV_FIELDS)}")
        rows = []
        for line_number, fields in enumerate(reader, start=2):
            if len(fields) != len(CSV_FIELDS):
                raise UserError(
                    f"{path}:{line_number}: expected {len(CSV_FIELDS)} fields, got {len(fields)}")
            row = dict(zip(CSV_FIELDS, fields))
            for field, allowed in (("slice", TABLE_SLICES), ("metric", METRICS)):
                if row[field] not in allowed:
                    raise UserError(
                        f"{path}:{line_number}: field {field!r}: {row[field]!r} not in {allowed}")
            for field, convert in (("k", int), ("value", float)):
                try:
                    row[field] = convert(row[field])
                except ValueError:
                    raise UserError(
                        f"{path}:{line_number}: field {field!r}: not a number: {row[field]!r}") from None
            rows.append(row)
    return rows


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """Rows of `new` replace those of the same models in `existing`; other models are kept.

    Models keep their place in `existing`; models seen only in `new` follow in their order there.
    """
    new_models = _models_in_order(new)
    old_models = _models_in_order(existing)
    order = old_models + [m for m in new_models if m not in old_models]
    by_model = {m: [r for r in existing if r["model"] == m] for m in order if m not in new_models}
    by_model.update({m: [r for r in new if r["model"] == m] for m in new_models})
    return [row for model in order for row in by_model[model]]


def write_results(rows: list[dict], results_dir: str, skipped: dict | None = None) -> list[dict]:
    """Merges `rows` into results_dir/results.csv, `skipped` into skipped.json, and rewrites results.md
    and the bar charts.

    Args:
      rows: dicts with keys model, slice (all|cold|warm), metric (HR|MRR|NDCG), k (int), value (%).
      results_dir: DIR/results (created when missing); results.md lists the training epochs of the
        models that have a DIR/msbr/<model>/selection.json.
      skipped: {model: why it was not evaluated}. A model with rows now is no longer skipped.
    Returns:
      All rows now in results.csv.
    """
    os.makedirs(results_dir, exist_ok=True)
    csv_path = os.path.join(results_dir, "results.csv")
    existing = read_results(csv_path) if os.path.exists(csv_path) else []
    # Rounded as the csv stores them, so the returned rows equal what read_results gives back.
    merged = merge_rows(existing, [dict(r, value=round(r["value"], 2)) for r in rows])
    with atomic_open(csv_path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        writer.writerows([r["model"], r["slice"], r["metric"], r["k"], f"{r['value']:.2f}"] for r in merged)
    evaluated = set(_models_in_order(rows))
    skipped = {model: reason for model, reason in {**read_skipped(results_dir), **(skipped or {})}.items()
               if model not in evaluated}
    with atomic_open(os.path.join(results_dir, SKIPPED_FILE)) as f:
        json.dump(skipped, f, indent=1)
    epochs = read_epochs(os.path.dirname(os.path.abspath(results_dir)), _models_in_order(merged))
    with atomic_open(os.path.join(results_dir, "results.md")) as f:
        f.write(markdown_tables(merged, skipped, epochs))
    for metric, k in PLOTTED:
        plots.bar_chart(merged, metric, k, os.path.join(results_dir, f"{metric.lower()}{k}.png"))
    return merged


def read_skipped(results_dir: str) -> dict:
    """{model: reason} of results_dir/skipped.json ({} when there is none)."""
    path = os.path.join(results_dir, SKIPPED_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


RANKS_FILE = "ranks.npz"
PROBE_FILE = "probe.json"  # the retrieval probe of each export (runner.write_exports)
_RANK_PREFIX = "model:"


def write_ranks(ranks_of: dict, cold_mask, results_dir: str) -> None:
    """Merges per-example test ranks {model: int [num_examples]} into results_dir/ranks.npz (atomically).

    The paired significance tests (eval/significance.py) compare rows example by example, which the
    rounded averages of results.csv cannot. A model evaluated again replaces its old ranks.
    """
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, RANKS_FILE)
    cold_mask = np.asarray(cold_mask, bool)
    existing = {}
    if os.path.exists(path):
        existing, old_mask = read_ranks(path)
        if not np.array_equal(old_mask, cold_mask):
            existing = {}  # ranks of another test split: dropped, they would pair with the wrong examples
    arrays = {_RANK_PREFIX + name: ranks for name, ranks in {**existing, **ranks_of}.items()}
    with atomic_open(path, "wb") as f:
        np.savez(f, cold_mask=cold_mask, **arrays)


def read_ranks(path: str) -> tuple[dict, np.ndarray]:
    """({model: int [num_examples] test ranks}, bool [num_examples] cold-target mask) of a ranks.npz."""
    with np.load(path) as archive:
        ranks = {key[len(_RANK_PREFIX):]: archive[key] for key in archive.files if key.startswith(_RANK_PREFIX)}
        return ranks, archive["cold_mask"]


def read_epochs(workdir: str, models) -> dict:
    """{model: its selection.json} for the `models` with a DIR/msbr/<model>/selection.json, in order."""
    selections = {}
    for model in models:
        path = os.path.join(layout.row_dir(workdir, model), layout.SELECTION_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                selections[model] = json.load(f)
    return selections


def epochs_table(selections: dict) -> str:
    """Markdown: per neural row, the selected epoch, the epochs trained, the cap and what stopped it.

    `stopped by` is `patience` when validation stopped improving before `msbr.max_epochs` (the row's
    recorded cap), `cap` when the cap ended training, `interrupted` when training did not finish.
    """
    lines = ["### training epochs", "", "| model | best epoch / epochs run | epoch cap | stopped by | "
             "valid MRR@20 |", "|---|---:|---:|---|---:|"]
    for model, selection in selections.items():
        run = max(int(epoch) for epoch in selection["history"])
        cap = selection.get("inputs", {}).get("config", {}).get("msbr.max_epochs")
        if not selection["finished"]:
            stopped = "interrupted"
        elif cap is None:  # a selection from before the inputs were recorded
            stopped = "–"
        else:
            stopped = "cap" if run == cap else "patience"
        lines.append(f"| {model} | {selection['best_epoch']} / {run} | {'–' if cap is None else cap} | "
                     f"{stopped} | {selection['best_metric']:.2f} |")
    return "\n".join(lines)


def markdown_tables(rows: list[dict], skipped: dict | None = None, epochs: dict | None = None) -> str:
    """One Markdown table per slice: models as rows, HR/MRR/NDCG @5/10/20 as columns, best in bold;
    then the training epochs of the neural rows (`epochs`: {model: selection}, `epochs_table`) and the
    `skipped` rows ({model: reason}), one line per reason.

    Ties for the best are all bold; a column where every model scores 0 has no bold.
    """
    models = _models_in_order(rows)
    values = {(r["model"], r["slice"], r["metric"], r["k"]): round(r["value"], 2) for r in rows}
    header = "| model | " + " | ".join(f"{m}@{k}" for m, k in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    sections = []
    for slice_name in TABLE_SLICES:
        best = {}
        for column in TABLE_COLUMNS:
            ranked = [values.get((m, slice_name, *column)) for m in models if m not in NOT_RANKED]
            best[column] = max((v for v in ranked if v is not None), default=None)
        lines = [f"### {slice_name}", "", header, rule]
        for model in models:
            cells = []
            for column in TABLE_COLUMNS:
                value = values.get((model, slice_name, *column))
                if value is None:
                    cells.append("–")
                elif model not in NOT_RANKED and value == best[column] and value > 0:
                    cells.append(f"**{value:.2f}**")
                else:
                    cells.append(f"{value:.2f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    if epochs:
        sections.append(epochs_table(epochs))
    if skipped:
        sections.append("### skipped\n\n" + "\n".join(f"- {line}" for line in skipped_lines(skipped)))
    return "\n\n".join(sections) + "\n"


def skipped_lines(skipped: dict) -> list[str]:
    """One line per reason of {model: reason}: `a, b: reason`, models in their order."""
    by_reason = {}
    for model, reason in skipped.items():
        by_reason.setdefault(reason, []).append(model)
    return [f"{', '.join(models)}: {reason}" for reason, models in by_reason.items()]


def read_metric_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a run killed while logging) is left out.

    Raises:
      RawFormatError naming the file and line of any other line that is not a JSON object.
    """
    return [record for _, record in raw.json_lines(path, "tolerate_torn_end")]


def _models_in_order(rows: list[dict]) -> list[str]:
    """Distinct model names in order of first appearance."""
    return list(dict.fromkeys(r["model"] for r in rows))
