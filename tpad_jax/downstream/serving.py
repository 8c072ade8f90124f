"""Serving a finished downstream row: checked to be trained, loaded only for the inputs it was trained on."""

import os

from tpad_jax import layout, provenance, rows
from tpad_jax.cli import UserError
from tpad_jax.downstream.features import load_features
from tpad_jax.downstream.params import load_params
from tpad_jax.downstream.scoring import fusion_metric, fusion_weights, metric_label
from tpad_jax.downstream.selection import (fusion_metric_of, fusion_record, inputs_record, read_fusion,
                                           read_selection)
from tpad_jax.downstream.settings import model_factory

_UNREAD = object()  # load_selected's default: read the content features


def check_trained(workdir: str, name: str) -> None:
    """Raises UserError unless DIR/msbr/<name>/ holds a finished selection (interrupted: not servable); for
    a row that ranks another row's model (`rows.trained_row`), that row's directory."""
    name = rows.trained_row(name)
    directory = layout.row_dir(workdir, name)
    selection = read_selection(directory)
    if selection is None:
        raise UserError(f"{directory}: model {name!r} is not trained in this workdir; launch/train.py trains "
                        f"it (or launch/evaluate.py --models={name} once its features are exported)")
    if not selection["finished"]:
        raise UserError(f"{directory}/{layout.SELECTION_FILE}: the training of {name!r} was interrupted "
                        f"(finished: false); rerun launch/evaluate.py --models={name} to finish it")


def load_selected(name: str, config, workdir: str, data, features=_UNREAD):
    """The model `name` with its selected (best validation) parameters, on the default device.

    `features`: the model's exported features when the caller has them (else read here).

    Raises:
      UserError when the row was trained on other inputs than `config`, `data` and its export now
      give (it would score with other settings than it learned, or not load at all).
    """
    name = rows.trained_row(name)  # a row fused with another export's kNN ranks this row's model
    directory = layout.row_dir(workdir, name)
    record = inputs_record(name, config, workdir, data)
    stored = (read_selection(directory) or {}).get("inputs")
    if provenance.identity(stored) != provenance.identity(record):
        raise UserError(f"{directory}: model {name!r} was trained on other inputs than these settings "
                        f"({provenance.differences(stored, record)}); launch/evaluate.py --models={name} "
                        "trains it again")
    if features is _UNREAD:
        features = load_features(workdir, rows.neural_row(name).export, data)
    model = model_factory(name, config, data.num_items, features, data.train_item_counts)()
    load_params(layout.best_params_file(workdir, name), model)
    return model


def fusion_weight(name: str, config, workdir: str, data) -> float | None:
    """The kNN fusion weight that evaluation chose for row `name` (DIR/msbr/<name>/knn_fusion.json), so
    that serving ranks as the row was measured; None when `msbr.knn_fusion` is off or the row reads IDs only.

    Raises:
      UserError when the row was not ranked with fusion, was ranked with other weights than `config`
      offers or chosen by another validation metric, or the weight was chosen for a model trained on
      other inputs.
    """
    weights = fusion_weights(config)
    if not weights or rows.knn_export_of(name) is None:
        return None
    directory = layout.row_dir(workdir, name)
    path, fusion = os.path.join(directory, layout.FUSION_FILE), read_fusion(directory)
    evaluate = f"launch/evaluate.py --models={name} chooses it"
    offered = ",".join(f"{weight:g}" for weight in weights)
    if fusion is None:
        raise UserError(f"{path}: missing; msbr.knn_fusion={offered} needs the weight chosen on validation "
                        f"when the row is evaluated ({evaluate})")
    if tuple(float(weight) for weight in fusion["weights"]) != weights:
        chosen_among = ",".join(f"{float(weight):g}" for weight in fusion["weights"])
        raise UserError(f"{path}: the weight was chosen among {chosen_among}, not msbr.knn_fusion={offered} "
                        f"({evaluate} again)")
    metric = metric_label(fusion_metric(config))
    if fusion_metric_of(fusion) != metric:
        raise UserError(f"{path}: the weight was chosen on validation {fusion_metric_of(fusion)}, not "
                        f"msbr.knn_fusion_metric={metric} ({evaluate} again)")
    record = fusion_record(name, config, workdir, data)
    if provenance.identity(fusion["inputs"]) != provenance.identity(record):
        raise UserError(f"{path}: chosen for a model trained on other inputs "
                        f"({provenance.differences(fusion['inputs'], record)}); {evaluate} again")
    return float(fusion["chosen"])
