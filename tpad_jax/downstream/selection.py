"""The validation selection of a downstream row (DIR/msbr/<row>/selection.json) and the inputs it records.

`selection.json` records the validation metric of every epoch, the best epoch, whether training
finished, and the `provenance` record of the row's inputs (data, its settings, the export it read).
`knn_fusion.json` records, under `msbr.knn_fusion`, the weights offered, the validation metric of each
(`msbr.knn_fusion_metric`) and the chosen one, with the same record (and the id of the export its kNN
reads when that is another, `fusion_record`): serving reads the weight from it rather than choose again.
"""

import json
import os

from tpad_jax import layout, provenance, rows
from tpad_jax import workdir as workdir_lib
from tpad_jax.downstream.features import complete_export_dir
from tpad_jax.downstream.scoring import metric_label
from tpad_jax.downstream.settings import row_config

SELECTION_METRIC = ("MRR", 20)  # validation metric that picks the epoch (and the default model)
VALID_SPLIT = "valid"


def selection_state(history: dict, patience: int) -> dict:
    """Best epoch (earliest on ties), its metric and whether patience ran out, from {epoch: metric}."""
    best_epoch = max(sorted(history), key=lambda epoch: history[epoch])
    last_epoch = max(history)
    return {"best_epoch": best_epoch, "best_metric": history[best_epoch],
            "stop": last_epoch - best_epoch >= patience}


def read_selection(directory: str) -> dict | None:
    """The selection.json of a model directory, or None before the first validation."""
    return workdir_lib.read_json(os.path.join(directory, layout.SELECTION_FILE))


def inputs_record(name: str, config, workdir: str, data) -> dict:
    """The `provenance` record of row `name` trained now: this data, `config` and the export it reads.

    Raises:
      UserError when the row's export is missing or was not made from this data.
    """
    variant = rows.neural_row(name).export
    export_id = None if variant is None else provenance.export_id(complete_export_dir(workdir, variant),
                                                                  data.fingerprint)
    return provenance.downstream_record(row_config(name, config), data.fingerprint, export_id)


def fusion_record(name: str, config, workdir: str, data) -> dict:
    """The record a kNN fusion choice of row `name` is valid for: its `inputs_record`, and the id of the
    export its kNN reads when that is not its own (`rows.Row.knn`)."""
    record = inputs_record(name, config, workdir, data)
    knn = rows.knn_export_of(name)
    if knn != rows.neural_row(name).export:
        record["knn_export"] = provenance.export_id(complete_export_dir(workdir, knn), data.fingerprint)
    return record


def write_selection(directory: str, history: dict, state: dict, record: dict, finished: bool) -> None:
    """Writes the selection.json of `directory` (atomically): `history` {epoch: metric} and its `state`."""
    _write_json(os.path.join(directory, layout.SELECTION_FILE), {
        "metric": metric_label(SELECTION_METRIC), "split": VALID_SPLIT, "best_epoch": state["best_epoch"],
        "best_metric": state["best_metric"], "history": {str(e): v for e, v in sorted(history.items())},
        "finished": finished, "inputs": record})


def write_fusion(directory: str, valid_of: dict, chosen: float, record: dict, metric: str) -> None:
    """Writes knn_fusion.json of `directory`: {weight: validation `metric`} (e.g. "HR@20"), the `chosen`
    weight, `record`."""
    _write_json(os.path.join(directory, layout.FUSION_FILE), {
        "metric": metric, "split": VALID_SPLIT,
        "weights": list(valid_of), "valid": [valid_of[weight] for weight in valid_of], "chosen": chosen,
        "inputs": record})


def read_fusion(directory: str) -> dict | None:
    """The knn_fusion.json of a model directory, or None when the row was never ranked with fusion."""
    return workdir_lib.read_json(os.path.join(directory, layout.FUSION_FILE))


def fusion_metric_of(fusion: dict) -> str:
    """The validation metric a knn_fusion.json chose by (files written before the choice was a setting
    chose by the epoch's metric, MRR@20)."""
    return fusion.get("metric", metric_label(SELECTION_METRIC))


def chosen_fusion(workdir: str, names, weights, metric: str) -> dict:
    """{row: kNN fusion weight chosen on validation} of the rows among `names` whose knn_fusion.json chose
    among `weights` by `metric` (a choice among other weights or by another metric belongs to another
    evaluation: left out)."""
    chosen = {}
    for name in names:
        fusion = read_fusion(layout.row_dir(workdir, name))
        if (fusion is not None and tuple(float(weight) for weight in fusion["weights"]) == tuple(weights)
                and fusion_metric_of(fusion) == metric):
            chosen[name] = float(fusion["chosen"])
    return chosen


def _write_json(path: str, value) -> None:
    with workdir_lib.atomic_open(path, encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
