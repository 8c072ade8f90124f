"""Training a downstream row with validation model selection, and its test ranks.

After every epoch the model is ranked on the validation split (never on test): the best epoch's
parameters are kept in DIR/msbr/<name>/best.npz and training stops after `msbr.patience` epochs without
improvement. A finished selection of the same inputs is never trained again, one of other inputs is
moved aside and trained anew.
"""

import os

import ml_collections
import numpy as np
import tqdm
from flax import nnx

from tpad_jax import layout, provenance, rows
from tpad_jax.downstream.features import load_features, normalise_content
from tpad_jax.downstream.params import save_params
from tpad_jax.downstream.scoring import (choose_weight, fused_ranks, fusion_metric, fusion_weights, metric_label,
                                         rank_split)
from tpad_jax.downstream.selection import (SELECTION_METRIC, VALID_SPLIT, fusion_record, inputs_record,
                                           read_selection, selection_state, write_fusion, write_selection)
from tpad_jax.downstream.serving import load_selected
from tpad_jax.downstream.settings import encoder_config, model_factory, row_config
from tpad_jax.downstream.tables import (PrefixTable, SessionTable, counted_vectors, prefix_width,
                                        training_batches)
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.models import session_encoders
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import loop, optim

TEST_SPLIT = "test"


class _PatienceExhausted(Exception):
    """Raised by the validation callback to end `run_loop` early (it has no stop signal of its own)."""


def train_msbr(name: str, config, workdir: str, data):
    """Trains `name` with validation model selection (resuming if interrupted); returns the selected model.

    A finished selection in DIR/msbr/<name>/selection.json of the same inputs is loaded, not retrained;
    work of other inputs is moved aside first (`provenance.claim`). A row that ranks another row's model
    (`rows.trained_row`) trains that row.
    """
    if rows.trained_row(name) != name:
        return train_msbr(rows.trained_row(name), config, workdir, data)
    variant = rows.neural_row(name).export
    config = row_config(name, config)
    directory = layout.row_dir(workdir, name)
    record = inputs_record(name, config, workdir, data)
    provenance.claim(workdir, layout.row_name(name), record, f"downstream {name}")
    selection = read_selection(directory)
    if selection is not None and selection["finished"]:
        return load_selected(name, config, workdir, data)

    msbr = config.msbr
    width = prefix_width(config)
    features = load_features(workdir, variant, data)
    make_model = model_factory(name, config, data.num_items, features, data.train_item_counts)

    # ----------------------------------------------------------------------------------- input
    mesh = mesh_lib.make_mesh(config.mesh)
    whole_sessions = msbr.whole_sessions and encoder_config(name, config).reads_every_position
    if whole_sessions:
        table, batch_size = SessionTable.every_session(data.train, width), msbr.sessions_per_batch
    else:
        table, batch_size = PrefixTable.every_prefix(data.train, width), msbr.batch_size
    batches, steps_per_epoch = training_batches(config, table, msbr.max_epochs, batch_size,
                                                mesh_lib.local_batch_shards(mesh))
    num_steps = msbr.max_epochs * steps_per_epoch

    def loss_fn(model, batch, rng):
        # Dropout draws from a copy reseeded with the loop's per-step key: the stored stream stays as it
        # is (the loop's model variables belong to an outer trace), and a resumed run draws the same masks.
        model = nnx.clone(model)
        nnx.reseed(model, default=rng)
        if whole_sessions:  # the loss scores the counted positions only (`SessionTable.batch`)
            vecs = counted_vectors(model.position_vectors(batch["items"], batch["mask"]), batch["positions"])
        else:
            vecs = model(batch["items"], batch["mask"])
        loss = session_encoders.chunked_softmax_cross_entropy(
            vecs, model.item_table(), batch["target"].reshape(-1), msbr.score_chunk,
            mask=batch["valid"].reshape(-1))
        return loss, {}

    # ------------------------------------------------------------------------------ validation
    valid_prefixes, valid_targets = data.examples(VALID_SPLIT)
    history = {} if selection is None else {int(e): v for e, v in selection["history"].items()}
    metric_name = metric_label(SELECTION_METRIC)

    def validate(model, step):
        epoch = step // steps_per_epoch
        ranks = rank_split(model, config, valid_prefixes, valid_targets)
        values = metrics_lib.metrics_from_ranks(ranks, (SELECTION_METRIC[1],))
        # Epochs after this one belong to a run that was interrupted before its checkpoint: redone now.
        for stale in [e for e in history if e >= epoch]:
            del history[stale]
        history[epoch] = values[SELECTION_METRIC]
        state = selection_state(history, msbr.patience)
        if state["best_epoch"] == epoch:
            save_params(layout.best_params_file(workdir, name), model)
        write_selection(directory, history, state, record, finished=False)
        tqdm.tqdm.write(f"{name} epoch {epoch}: valid {metric_name} {history[epoch]:.2f} "
                        f"(best {state['best_metric']:.2f} at epoch {state['best_epoch']})")
        if state["stop"]:
            raise _PatienceExhausted
        return {f"valid_{m.lower()}{k}": v for (m, k), v in values.items()}

    # ------------------------------------------------------------------------------------ loop
    # Validation every epoch; the state is saved less often. A run interrupted between saves resumes
    # from the last one and redoes the epochs after it, their validations included (`validate` above).
    train_config = ml_collections.ConfigDict(dict(
        config.train.to_dict(), eval_every=steps_per_epoch,
        checkpoint_every=steps_per_epoch * msbr.checkpoint_every_epochs))
    groups = {"all": optim.GroupSchedule(".*", msbr.learning_rate, 0, num_steps, msbr.lr_decay)}
    try:
        loop.run_loop(
            workdir=directory, train_config=train_config, mesh=mesh,
            rules=rules_lib.get_rules(config.mesh.rules), make_model=make_model,
            tx=optim.make_optimizer(groups, config.train.grad_clip, config.train.weight_decay),
            wrt=nnx.Param, loss_fn=loss_fn, data_iterator=batches, num_steps=num_steps, seed=config.seed,
            eval_fn=validate, desc=f"msbr {name}")
    except _PatienceExhausted:
        pass
    if not history:
        raise ValueError(f"{name}: training ended without a validation epoch")
    write_selection(directory, history, selection_state(history, msbr.patience), record, finished=True)
    return load_selected(name, config, workdir, data, features)


def evaluate_neural(name: str, config, workdir: str, data) -> np.ndarray:
    """Test ranks int32 [num_test] of the neural model `name`, aligned with data.examples("test").

    Trains the model first when DIR/msbr/<name>/ holds no finished selection.
    """
    model = train_msbr(name, config, workdir, data)
    prefixes, targets = data.examples(TEST_SPLIT)
    ranks = rank_split(model, config, prefixes, targets, chosen_knn(name, model, config, workdir, data))
    return ranks.astype(np.int32)


def chosen_knn(name: str, model, config, workdir: str, data):
    """(unit kNN export rows, weight) of the trained content row `name` under `msbr.knn_fusion`, the weight of
    best validation `msbr.knn_fusion_metric` (MRR@20 unless set); None when fusion is off or the row reads
    IDs only.

    The trained model is the same with and without fusion: only its ranking gains the export's kNN.
    The choice is written to DIR/msbr/<name>/knn_fusion.json, where serving reads it.
    """
    weights = fusion_weights(config)
    variant = rows.knn_export_of(name)  # the row's own export unless it names another (`rows.Row.knn`)
    if not weights or variant is None:
        return None
    metric = fusion_metric(config)
    unit = normalise_content(load_features(workdir, variant, data), "l2")
    prefixes, targets = data.examples("valid")
    valid_of = {weight: metrics_lib.metrics_from_ranks(ranks, (metric[1],))[metric]
                for weight, ranks in fused_ranks(model, config, prefixes, targets, unit, weights).items()}
    chosen = choose_weight(valid_of)
    os.makedirs(layout.row_dir(workdir, name), exist_ok=True)  # a row that ranks another row's model
    write_fusion(layout.row_dir(workdir, name), valid_of, chosen, fusion_record(name, config, workdir, data),
                 metric_label(metric))
    print(f"{name}: kNN fusion weight {chosen:g} chosen on validation {metric_label(metric)} ("
          + ", ".join(f"{weight:g}: {value:.2f}" for weight, value in valid_of.items()) + ")", flush=True)
    return unit, chosen
