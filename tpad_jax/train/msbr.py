"""Stage 4: train the downstream session recommenders, select them on validation, rank the test split.

Every neural row of the comparison is one session encoder (`models/msbr.py`) over item inputs
[ID embedding ; W e_content], where the content features come from an export directory of the
workdir (or are absent for ID-only models). Training examples are all prefixes of the train sessions
with their next click; the loss is the full-softmax cross-entropy. Causal encoders (GRU4Rec, the causal
transformer) read every prefix of a session in one pass (`SessionTable`, `msbr.whole_sessions`); the
others read one prefix per row (`PrefixTable`). Rows are batched by length bucket
(`msbr.length_buckets`) so that short ones are not padded to the full width. After every epoch the
model is ranked on the validation split (never on test): the best epoch's parameters are kept in
`DIR/msbr/<name>/best.npz` and training stops after `msbr.patience` epochs without improvement. Each
row trains, is served and is recorded under its own settings (`row_config`: `msbr.per_model.<row>`
over `msbr.*`). `selection.json` records the choice and the `provenance` record of the row's inputs
(data, its settings, the export it read); a finished selection of the same inputs is never trained
again, one of other inputs is moved aside and trained anew, and
`load_selected` serves a row only for the inputs it was trained on.
"""

import dataclasses
import json
import os

import grain
import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from tpad_jax import export, provenance
from tpad_jax import workdir as workdir_lib
from tpad_jax.cli import UserError
from tpad_jax.data import pipeline, raw
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.models import msbr as msbr_models
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import loop, optim

# name -> (session encoder, export directory of the content features in DIR, or None for ID only).
NEURAL_MODELS = {
    "gru4rec": ("gru4rec", None),
    "transformer": ("transformer", None),
    "srgnn": ("srgnn", None),
    "transformer+raw": ("transformer", "export_raw"),
    "transformer+stage1": ("transformer", "export_stage1"),
    "tpad": ("transformer", "export"),
    "srgnn+tpad": ("srgnn", "export"),
    "tpad-no-gen": ("transformer", "export_no-gen"),
    "tpad-no-disentangle": ("transformer", "export_no-disentangle"),
    "tpad-no-align": ("transformer", "export_no-align"),
    "transformer+minilm": ("transformer", "export_minilm"),
}
# Settings a row may set for itself in `msbr.per_model.<row>.<key>` (None: the row takes `msbr.<key>`).
ROW_SETTINGS = ("learning_rate", "hidden_dim", "dropout", "max_epochs", "patience")
SELECTION_METRIC = ("MRR", 20)  # validation metric that picks the epoch (and the default model)
SELECTION_FILE = "selection.json"
BEST_PARAMS = "best.npz"
VALID_SPLIT = "valid"
TEST_SPLIT = "test"


class _PatienceExhausted(Exception):
    """Raised by the validation callback to end `run_loop` early (it has no stop signal of its own)."""


def model_dir(workdir: str, name: str) -> str:
    """DIR/msbr/<name>/."""
    return os.path.join(workdir, "msbr", name)


def prefix_width(config) -> int:
    """Items an encoder sees: the last `max_session_length - 1` clicks (a whole session minus its target)."""
    return config.data.max_session_length - 1


def padded_examples(examples: pipeline.SessionExamples, width: int):
    """Right-padded prefixes (their last `width` items) of `examples`.

    Returns:
      (items int32 [n, width] with row 0 on padding, mask bool [n, width]).
    """
    items, mask, _ = examples.last_items(np.arange(len(examples)), width)
    return items, mask


def pad_prefixes(prefixes, width: int):
    """(items int32 [n, width], mask bool [n, width]) of a list of prefixes (item rows)."""
    examples = pipeline.SessionExamples.from_prefixes(prefixes, np.zeros(len(prefixes), np.int32))
    return padded_examples(examples, width)


@dataclasses.dataclass(frozen=True)
class PrefixTable:
    """Random-access training examples (items [width], mask [width], target) stored as padded arrays."""

    items: np.ndarray
    mask: np.ndarray
    targets: np.ndarray

    @classmethod
    def every_prefix(cls, sessions, width: int):
        """One example per position j >= 1 of each session: prefix session[:j], target session[j]."""
        examples = pipeline.SessionExamples.every_position(sessions)
        return cls(*padded_examples(examples, width), examples.targets.astype(np.int32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.items[index], self.mask[index], self.targets[index]

    def batch(self, rows, width: int, valid):
        """{items [b, width], mask, target [b], valid [b]} of example `rows` (`valid` False on filler)."""
        return dict(items=self.items[rows, :width], mask=self.mask[rows, :width], target=self.targets[rows],
                    valid=valid)


@dataclasses.dataclass(frozen=True)
class SessionTable:
    """Whole sessions for causal encoders: inputs session[:-1], a target at every position.

    Holds exactly the (prefix, target) pairs of `PrefixTable.every_prefix`: a session of up to
    `width + 1` clicks is one row whose position j predicts click j + 1 from clicks 0..j. A longer
    session adds one row per later target: its last `width` clicks before that target, with only the
    last position counted, which is the prefix truncation `PrefixTable` applies.
    """

    items: np.ndarray  # int32 [n, width], right-padded
    mask: np.ndarray  # bool [n, width]
    targets: np.ndarray  # int32 [n, width], 0 where target_mask is False
    target_mask: np.ndarray  # bool [n, width]: positions whose prefix counts as an example

    @classmethod
    def every_session(cls, sessions, width: int):
        rows, targets, counted = [], [], []
        for session in sessions:
            session = np.asarray(session, np.int32)
            head = session[:width + 1]
            if len(head) >= 2:
                rows.append(head[:-1])
                targets.append(head[1:])
                counted.append(np.ones(len(head) - 1, bool))
            for end in range(width + 1, len(session)):
                rows.append(session[end - width:end])
                targets.append(np.concatenate([np.zeros(width - 1, np.int32), session[end:end + 1]]))
                counted.append(np.arange(width) == width - 1)
        n = len(rows)
        items = np.zeros((n, width), np.int32)
        target_table = np.zeros((n, width), np.int32)
        target_mask = np.zeros((n, width), bool)
        for i, (row, target, count) in enumerate(zip(rows, targets, counted)):
            items[i, :len(row)], target_table[i, :len(row)], target_mask[i, :len(row)] = row, target, count
        mask = np.arange(width)[None, :] < np.array([len(row) for row in rows], np.int64).reshape(-1, 1)
        return cls(items, mask, target_table, target_mask)

    def __len__(self):
        return len(self.items)

    def batch(self, rows, width: int, valid):
        """{items, mask, target, valid} all [b, width]: one example per counted position of a valid row."""
        return dict(items=self.items[rows, :width], mask=self.mask[rows, :width],
                    target=self.targets[rows, :width], valid=self.target_mask[rows, :width] & valid[:, None])


class BucketedBatches:
    """Random-access training batches of table rows grouped by length; batch i is batch i % n of epoch i // n.

    Every epoch shuffles the examples (seeded by `seed` and the epoch), sorts them into the first
    width of `widths` that holds them, and cuts each group into global batches of that width, so short
    prefixes (most of them) are not padded to the full width. A group's last batch is filled with
    `valid=False` rows, which keeps the number of batches per epoch fixed. Element i is this process's
    slice of global batch i: `table.batch(...)` (for a PrefixTable: items int32 [b, w], mask bool
    [b, w], target int32 [b], valid bool [b]).
    """

    def __init__(self, table: PrefixTable | SessionTable, widths, batch_size: int, seed: int, num_epochs: int,
                 process_index: int = 0, process_count: int = 1):
        self.table, self.widths, self.batch_size, self.seed = table, tuple(widths), batch_size, seed
        self.num_epochs, self.process_index, self.process_count = num_epochs, process_index, process_count
        if list(self.widths) != sorted(self.widths) or self.widths[-1] != table.items.shape[1]:
            raise ValueError(f"bucket widths {self.widths} must increase up to the full width "
                             f"{table.items.shape[1]}")
        self.bucket_of_example = np.searchsorted(np.asarray(self.widths), table.mask.sum(axis=1))
        counts = np.bincount(self.bucket_of_example, minlength=len(self.widths))
        self.batches_per_epoch = int(np.sum(-(-counts // batch_size)))
        self._plans = {}

    def plan(self, epoch: int) -> list:
        """[(width, example indices [batch_size], -1 on filler rows)] of one epoch, in training order."""
        if epoch not in self._plans:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self.table))
            buckets = self.bucket_of_example[order]
            batches = []
            for bucket, width in enumerate(self.widths):
                members = order[buckets == bucket]
                filler = -len(members) % self.batch_size
                members = np.concatenate([members, np.full(filler, -1, members.dtype)])
                batches += [(width, chunk) for chunk in members.reshape(-1, self.batch_size)]
            self._plans[epoch] = [batches[i] for i in rng.permutation(len(batches))]
        return self._plans[epoch]

    def __len__(self):
        return self.num_epochs * self.batches_per_epoch

    def __getitem__(self, index):
        epoch, position = divmod(index, self.batches_per_epoch)
        width, rows = self.plan(epoch)[position]
        local = self.batch_size // self.process_count
        rows = rows[self.process_index * local:(self.process_index + 1) * local]
        valid = rows >= 0
        return self.table.batch(np.where(valid, rows, 0), width, valid)


def training_batches(config, table: PrefixTable | SessionTable, num_epochs: int, batch_size: int):
    """The grain iterator over this process's `BucketedBatches` (checkpointable) and batches per epoch."""
    msbr = config.msbr
    if batch_size % jax.process_count():
        raise UserError(f"msbr batch size {batch_size} is not divisible by {jax.process_count()} processes")
    full_width = table.items.shape[1]
    widths = sorted({w for w in msbr.length_buckets if w < full_width} | {full_width})
    source = BucketedBatches(table, widths, batch_size, config.seed, num_epochs,
                             jax.process_index(), jax.process_count())
    threads = config.data.read_threads
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(grain.MapDataset.source(source).to_iter_dataset(read_options)), source.batches_per_epoch


def export_dir(workdir: str, export_subdir: str) -> str:
    """DIR/<export_subdir>, once it holds a whole export (else UserError)."""
    directory = os.path.join(workdir, export_subdir)
    if not export.is_complete(directory):
        raise UserError(
            f"{directory}/{export.EMBEDDINGS_FILE}: missing; run the stage that exports these features first")
    return directory


def load_features(workdir: str, export_subdir: str | None, data) -> np.ndarray | None:
    """The exported features [N, d_c] of DIR/<export_subdir> as written (None: ID only)."""
    if export_subdir is None:
        return None
    directory = export_dir(workdir, export_subdir)
    embeddings, item_ids, _ = export.load_export(directory)
    if list(item_ids) != list(data.item_ids):
        raise UserError(f"{directory}/item_ids.json: rows do not match the prepared catalogue "
                        f"({len(item_ids)} ids vs {data.num_items}); re-export for this data")
    return embeddings


CONTENT_NORMS = ("l2", "whiten")


def normalise_content(embeddings: np.ndarray, normalise: str, eps: float = 1e-3) -> np.ndarray:
    """`l2`: each row to unit length. `whiten`: centred and PCA-whitened over the catalogue (directions
    with variance below `eps` x the largest are damped, not blown up), scaled to mean squared norm 1.

    Why whiten: trained e_K are low-rank and clustered (a few attribute directions carry most of the
    variance), so under `l2` the projection sees items of one cluster as near-identical; whitening gives
    every direction the catalogue varies in the same weight.
    """
    return content_transform(embeddings, normalise, eps)(embeddings)


def content_transform(features: np.ndarray, normalise: str, eps: float = 1e-3):
    """The map `normalise_content(features, normalise)` applies to each row, fitted on `features` once,
    so that rows outside them (new items) get the catalogue's statistics, not their own."""
    if normalise == "l2":  # per row: nothing to fit
        def unit(rows):
            x = np.asarray(rows, np.float64)
            return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return unit
    if normalise != "whiten":
        raise UserError(f"msbr.content_norm must be one of {CONTENT_NORMS}, got {normalise!r}")
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    variances, vectors = np.linalg.eigh((x - mean).T @ (x - mean) / len(x))
    variances = np.maximum(variances, 0.0)
    scale = np.sqrt(variances + eps * variances.max())
    white = ((x - mean) @ vectors) / scale
    norm = np.sqrt(np.mean(np.sum(white * white, axis=1)))

    def whiten(rows):
        return ((((np.asarray(rows, np.float64) - mean) @ vectors) / scale) / norm).astype(np.float32)
    return whiten


def row_config(name: str, config):
    """`config` as the neural row `name` sees it: `msbr.per_model[name]`'s settings in place of `msbr.*`.

    The copy has no `per_model` section, so the row's provenance record holds its own effective
    settings: a per-row setting retrains that row and no other. A config without the section (or a
    copy this returned) is returned as it is.

    Raises:
      UserError for a per_model entry of an unknown row or a key outside `ROW_SETTINGS`.
    """
    _model_spec(name)
    per_model = config.msbr.get("per_model")
    if per_model is None:
        return config
    problems = [f"unknown row {row!r}" for row in per_model if row not in NEURAL_MODELS]
    problems += [f"{row}.{key}: not a per-row setting" for row, settings in per_model.items()
                 for key in settings if key not in ROW_SETTINGS]
    if problems:
        raise UserError(f"msbr.per_model: {'; '.join(problems)}; rows: {', '.join(NEURAL_MODELS)}; "
                        f"settings: {', '.join(ROW_SETTINGS)}")
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        del resolved.msbr["per_model"]
        for key, value in per_model.get(name, {}).items():
            if value is not None:
                resolved.msbr[key] = value
    return resolved


def encoder_config(name: str, config) -> msbr_models.EncoderConfig:
    """The session encoder of the neural model `name` under its settings (`row_config`)."""
    encoder, _ = _model_spec(name)
    settings = msbr_models.EncoderConfig.from_config(row_config(name, config))
    return dataclasses.replace(settings, encoder=encoder)


def model_factory(name: str, config, num_items: int, features):
    """A deterministic `make_model()` for the neural model `name` over exported `features` (or None).

    The item vectors read the features normalised per `msbr.content_norm`; the last-item similarity
    term reads their unit rows, so that it is the cosine the retrieval probe ranks by.
    """
    config = row_config(name, config)
    cfg = encoder_config(name, config)
    content = similarity = None
    if features is not None:
        content = normalise_content(features, config.msbr.content_norm)
        if cfg.last_item_similarity:
            similarity = normalise_content(features, "l2")
    return lambda: msbr_models.SessionEncoder(cfg, num_items, content, similarity, rngs=nnx.Rngs(config.seed))


@nnx.jit
def _scores(model, items, mask):
    return model.scores(items, mask)


@nnx.jit
def _session_vectors(model, items, mask):
    return model(items, mask)


@nnx.jit
def _item_table(model):
    return model.item_table()


def _padded_chunk(prefixes, width: int, batch_size: int):
    """(items, mask) of `prefixes` padded to `batch_size` rows, so all chunks share one compiled shape."""
    items, mask = pad_prefixes(prefixes, width)
    filler = batch_size - len(prefixes)
    return np.pad(items, ((0, filler), (0, 0))), np.pad(mask, ((0, filler), (0, 0)))


def prefix_scorer(model, width: int, batch_size: int):
    """score_fn(prefixes) -> scores [len(prefixes) <= batch_size, N] of `model` with dropout off."""
    eval_model = nnx.view(model, deterministic=True)

    def score_fn(prefixes):
        return _scores(eval_model, *_padded_chunk(prefixes, width, batch_size))[:len(prefixes)]

    return score_fn


def rank_examples(model, prefixes, targets, width: int, batch_size: int) -> np.ndarray:
    """0-based ranks [n] of `targets` after `prefixes` (dropout off), `batch_size` prefixes at a time.

    Scores are session vectors times item vectors, so targets are ranked item chunk by item chunk
    (`metrics.rank_by_dot`): memory stays bounded by the chunk sizes, not by the catalogue.
    """
    targets = np.asarray(targets, np.int32)
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    eval_model = nnx.view(model, deterministic=True)
    table = _item_table(eval_model)
    ranks = []
    for start in range(0, len(targets), batch_size):
        chunk = prefixes[start:start + batch_size]
        vectors = _session_vectors(eval_model, *_padded_chunk(chunk, width, batch_size))[:len(chunk)]
        ranks.append(np.asarray(metrics_lib.rank_by_dot(vectors, table, targets[start:start + batch_size])))
    return np.concatenate(ranks) if ranks else np.zeros((0,), np.int32)


def selection_state(history: dict, patience: int) -> dict:
    """Best epoch (earliest on ties), its metric and whether patience ran out, from {epoch: metric}."""
    best_epoch = max(sorted(history), key=lambda epoch: history[epoch])
    last_epoch = max(history)
    return {"best_epoch": best_epoch, "best_metric": history[best_epoch],
            "stop": last_epoch - best_epoch >= patience}


def read_selection(directory: str) -> dict | None:
    """The selection.json of a model directory, or None before the first validation."""
    return workdir_lib.read_json(os.path.join(directory, SELECTION_FILE))


def _write_json(path: str, value) -> None:
    with workdir_lib.atomic_open(path, encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def save_params(path: str, model) -> None:
    """Writes the model's nnx.Param values to an .npz keyed by "/"-joined path (byte-deterministic)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    arrays = {optim.path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(pure)}
    raw.write_npz(path + ".tmp", arrays)
    os.replace(path + ".tmp", path)


def load_params(path: str, model) -> None:
    """Sets the model's nnx.Param values from `save_params`' file; every path and shape must match."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    expected = {optim.path_string(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(pure)}
    problems = [f"missing {k}" for k in expected if k not in arrays]
    problems += [f"unexpected {k}" for k in arrays if k not in expected]
    problems += [f"{k}: shape {arrays[k].shape} != {shape}" for k, shape in expected.items()
                 if k in arrays and arrays[k].shape != shape]
    if problems:
        raise ValueError(f"{path}: parameters do not fit the model: {'; '.join(problems)}")
    nnx.replace_by_pure_dict(
        state, jax.tree_util.tree_map_with_path(lambda p, _: arrays[optim.path_string(p)], pure))
    nnx.update(model, state)


_UNREAD = object()  # load_selected's default: read the content features


def load_selected(name: str, config, workdir: str, data, features=_UNREAD):
    """The model `name` with its selected (best validation) parameters, on the default device.

    `features`: the model's exported features when the caller has them (else read here).

    Raises:
      UserError when the row was trained on other inputs than `config`, `data` and its export now
      give (it would score with other settings than it learned, or not load at all).
    """
    directory = model_dir(workdir, name)
    record = inputs_record(name, config, workdir, data)
    stored = (read_selection(directory) or {}).get("inputs")
    if provenance.identity(stored) != provenance.identity(record):
        raise UserError(f"{directory}: model {name!r} was trained on other inputs than these settings "
                        f"({provenance.differences(stored, record)}); launch/evaluate.py --models={name} "
                        "trains it again")
    if features is _UNREAD:
        _, export_subdir = _model_spec(name)
        features = load_features(workdir, export_subdir, data)
    model = model_factory(name, config, data.num_items, features)()
    load_params(os.path.join(model_dir(workdir, name), BEST_PARAMS), model)
    return model


def inputs_record(name: str, config, workdir: str, data) -> dict:
    """The `provenance` record of row `name` trained now: this data, `config` and the export it reads.

    Raises:
      UserError when the row's export is missing or was not made from this data.
    """
    _, export_subdir = _model_spec(name)
    export_id = None if export_subdir is None else provenance.export_id(export_dir(workdir, export_subdir),
                                                                        data.fingerprint)
    return provenance.downstream_record(row_config(name, config), data.fingerprint, export_id)


def _model_spec(name: str):
    if name not in NEURAL_MODELS:
        raise UserError(f"unknown neural model {name!r}; known: {', '.join(NEURAL_MODELS)}")
    return NEURAL_MODELS[name]


def train_msbr(name: str, config, workdir: str, data):
    """Trains `name` with validation model selection (resuming if interrupted); returns the selected model.

    A finished selection in DIR/msbr/<name>/selection.json of the same inputs is loaded, not retrained;
    work of other inputs is moved aside first (`provenance.claim`).
    """
    _, export_subdir = _model_spec(name)
    config = row_config(name, config)
    directory = model_dir(workdir, name)
    record = inputs_record(name, config, workdir, data)
    provenance.claim(workdir, os.path.relpath(directory, workdir), record, f"downstream {name}")
    selection = read_selection(directory)
    if selection is not None and selection["finished"]:
        return load_selected(name, config, workdir, data)

    msbr = config.msbr
    width = prefix_width(config)
    features = load_features(workdir, export_subdir, data)
    make_model = model_factory(name, config, data.num_items, features)

    # ----------------------------------------------------------------------------------- input
    whole_sessions = msbr.whole_sessions and encoder_config(name, config).reads_every_position
    if whole_sessions:
        table, batch_size = SessionTable.every_session(data.train, width), msbr.sessions_per_batch
    else:
        table, batch_size = PrefixTable.every_prefix(data.train, width), msbr.batch_size
    batches, steps_per_epoch = training_batches(config, table, msbr.max_epochs, batch_size)
    num_steps = msbr.max_epochs * steps_per_epoch

    def loss_fn(model, batch, rng):
        # Dropout draws from a copy reseeded with the loop's per-step key: the stored stream stays as it
        # is (the loop's model variables belong to an outer trace), and a resumed run draws the same masks.
        model = nnx.clone(model)
        nnx.reseed(model, default=rng)
        if whole_sessions:
            vecs = model.position_vectors(batch["items"], batch["mask"])
            vecs = vecs.reshape(-1, vecs.shape[-1])
        else:
            vecs = model(batch["items"], batch["mask"])
        loss = msbr_models.chunked_softmax_cross_entropy(
            vecs, model.item_table(), batch["target"].reshape(-1), msbr.score_chunk,
            mask=batch["valid"].reshape(-1))
        return loss, {}

    # ------------------------------------------------------------------------------ validation
    valid_prefixes, valid_targets = data.examples(VALID_SPLIT)
    history = {} if selection is None else {int(e): v for e, v in selection["history"].items()}
    metric_name = f"{SELECTION_METRIC[0]}@{SELECTION_METRIC[1]}"

    def validate(model, step):
        epoch = step // steps_per_epoch
        ranks = rank_examples(model, valid_prefixes, valid_targets, width, msbr.eval_batch_size)
        values = metrics_lib.metrics_from_ranks(ranks, (SELECTION_METRIC[1],))
        # Epochs after this one belong to a run that was interrupted before its checkpoint: redone now.
        for stale in [e for e in history if e >= epoch]:
            del history[stale]
        history[epoch] = values[SELECTION_METRIC]
        state = selection_state(history, msbr.patience)
        if state["best_epoch"] == epoch:
            save_params(os.path.join(directory, BEST_PARAMS), model)
        _write_selection(directory, history, state, record, finished=False)
        tqdm.tqdm.write(f"{name} epoch {epoch}: valid {metric_name} {history[epoch]:.2f} "
                        f"(best {state['best_metric']:.2f} at epoch {state['best_epoch']})")
        if state["stop"]:
            raise _PatienceExhausted
        return {f"valid_{m.lower()}{k}": v for (m, k), v in values.items()}

    # ------------------------------------------------------------------------------------ loop
    train_config = ml_collections.ConfigDict(
        dict(config.train.to_dict(), eval_every=steps_per_epoch, checkpoint_every=steps_per_epoch))
    groups = {"all": optim.GroupSchedule(".*", msbr.learning_rate, 0, num_steps)}
    try:
        loop.run_loop(
            workdir=directory, train_config=train_config, mesh=mesh_lib.make_mesh(config.mesh),
            rules=rules_lib.get_rules(config.mesh.rules), make_model=make_model,
            tx=optim.make_optimizer(groups, config.train.grad_clip, config.train.weight_decay),
            wrt=nnx.Param, loss_fn=loss_fn, data_iterator=batches, num_steps=num_steps, seed=config.seed,
            eval_fn=validate, desc=f"msbr {name}")
    except _PatienceExhausted:
        pass
    if not history:
        raise ValueError(f"{name}: training ended without a validation epoch")
    _write_selection(directory, history, selection_state(history, msbr.patience), record, finished=True)
    return load_selected(name, config, workdir, data, features)


def _write_selection(directory: str, history: dict, state: dict, record: dict, finished: bool) -> None:
    metric = f"{SELECTION_METRIC[0]}@{SELECTION_METRIC[1]}"
    _write_json(os.path.join(directory, SELECTION_FILE), {
        "metric": metric, "split": VALID_SPLIT, "best_epoch": state["best_epoch"],
        "best_metric": state["best_metric"], "history": {str(e): v for e, v in sorted(history.items())},
        "finished": finished, "inputs": record})


def evaluate_neural(name: str, config, workdir: str, data) -> np.ndarray:
    """Test ranks int32 [num_test] of the neural model `name`, aligned with data.examples("test").

    Trains the model first when DIR/msbr/<name>/ holds no finished selection.
    """
    model = train_msbr(name, config, workdir, data)
    prefixes, targets = data.examples(TEST_SPLIT)
    ranks = rank_examples(model, prefixes, targets, prefix_width(config), config.msbr.eval_batch_size)
    return ranks.astype(np.int32)


def check_trained(workdir: str, name: str) -> None:
    """Raises UserError unless DIR/msbr/<name>/ holds a finished selection (interrupted: not servable)."""
    _model_spec(name)
    directory = model_dir(workdir, name)
    selection = read_selection(directory)
    if selection is None:
        raise UserError(f"{directory}: model {name!r} is not trained in this workdir; launch/train.py trains "
                        f"it (or launch/evaluate.py --models={name} once its features are exported)")
    if not selection["finished"]:
        raise UserError(f"{directory}/{SELECTION_FILE}: the training of {name!r} was interrupted "
                        f"(finished: false); rerun launch/evaluate.py --models={name} to finish it")
