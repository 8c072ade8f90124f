"""One results table from several runs on the same data split (e.g. tiny towers vs SmolLM2 towers).

Each run is a workdir with DIR/results/results.csv. Runs are compared only when their prepared splits
are byte-identical (same items, sessions and examples), whatever preset trained them. Rows keep their
model names; a model that an earlier run already reported with other values is renamed
`<model>-<label>` (the `tpad` row of the `smollm2` run becomes `tpad-smollm2`), and a model reported
with the same values (a deterministic baseline) is kept once.
"""

import hashlib
import json
import os

from tpad_jax import layout
from tpad_jax.cli import UserError
from tpad_jax.eval import report
from tpad_jax.workdir import atomic_open


def split_signature(workdir: str) -> str:
    """sha256 of the prepared splits and item ids of `workdir` (what makes two runs' test sets equal)."""
    prepared_dir = layout.prepared_dir(workdir)
    digest = hashlib.sha256()
    try:
        with open(os.path.join(prepared_dir, "splits.npz"), "rb") as f:
            digest.update(f.read())
        with open(os.path.join(prepared_dir, "catalogue.json"), encoding="utf-8") as f:
            digest.update(json.dumps(json.load(f)["item_ids"]).encode())
    except FileNotFoundError as error:
        raise UserError(f"{error.filename}: missing; {workdir} has no prepared data "
                       "(run launch/train.py or launch/prepare_data.py there first)") from None
    return digest.hexdigest()


def parse_runs(spec: str) -> list[tuple[str, str]]:
    """`label:DIR,label:DIR` -> [(label, DIR)]."""
    runs = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        label, sep, workdir = entry.partition(":")
        if not sep or not label or not workdir:
            raise UserError(f"--runs entry {entry!r}: expected label:DIR")
        runs.append((label, workdir))
    labels = [label for label, _ in runs]
    if len(runs) < 2 or len(set(labels)) != len(labels):
        raise UserError(f"--runs needs at least two runs with distinct labels, got {labels}")
    return runs


def merge_runs(runs: list[tuple[str, str]]) -> list[dict]:
    """Rows of every run's results.csv in one list (see module docstring for the naming rule).

    Raises:
      UserError when two runs were evaluated on different splits or one has no results.csv.
    """
    first_label, first_dir = runs[0]
    signature = split_signature(first_dir)
    for label, workdir in runs[1:]:
        if split_signature(workdir) != signature:
            raise UserError(f"{workdir}/data/prepared/splits.npz: run {label!r} was evaluated on other data "
                            f"than run {first_label!r} ({first_dir}); only runs on the same split compare")
    merged: dict[str, list[dict]] = {}
    for label, workdir in runs:
        path = os.path.join(layout.results_dir(workdir), "results.csv")
        if not os.path.exists(path):
            raise UserError(f"{path}: missing; run {label!r} has no results yet (launch/evaluate.py there)")
        rows = report.read_results(path)
        for model in dict.fromkeys(r["model"] for r in rows):
            model_rows = [r for r in rows if r["model"] == model]
            if model not in merged:
                merged[model] = model_rows
            elif _values(merged[model]) != _values(model_rows):
                renamed = f"{model}-{label}"
                merged[renamed] = [dict(r, model=renamed) for r in model_rows]
    return [row for rows in merged.values() for row in rows]


def write_comparison(runs: list[tuple[str, str]], out_dir: str) -> list[dict]:
    """Writes OUT/results.{csv,md} and the bar charts of the merged runs; returns the rows."""
    rows = merge_runs(runs)
    stale = os.path.join(out_dir, "results.csv")
    if os.path.exists(stale):  # write_results merges into an existing csv; a comparison starts afresh
        os.remove(stale)
    report.write_results(rows, out_dir)
    with atomic_open(os.path.join(out_dir, "runs.json")) as f:
        json.dump([{"label": label, "workdir": os.path.abspath(workdir)} for label, workdir in runs], f, indent=1)
    return rows


def _values(rows: list[dict]) -> dict:
    return {(r["slice"], r["metric"], r["k"]): r["value"] for r in rows}
