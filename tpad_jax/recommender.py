"""A trained downstream recommender as a service: loaded once, compiled once, batches of sessions in.

    from tpad_jax import Recommender
    recommender = Recommender.from_workdir("runs/base")          # the `tpad` row, the run's config.json
    recommender.recommend([["B01", "B07"], {"session_id": "s2", "items": ["B03"]}], k=10)
    recommender.add_items("new/items.jsonl")                      # items outside the catalogue

What a score is. The downstream model (models/session_encoders.py) scores item v after a session as the dot product
of the session vector with v's item vector x_v = E_id[v] + W c_v (plus g * cos(e[last click], e[v])
under `msbr.last_item_similarity`): the logit of v in the full softmax over all items that the model was
trained to predict the next click with. `score` is that logit; only its order within one session means
something. `probability` is the softmax itself, over every item the recommender holds (new ones
included, the session's own items not removed), so it compares across sessions. Under
`msbr.knn_fusion` the score also gains w x cos(e[last click], e[v]) over the row's export (or the one
its `rows.Row.knn` names), with the weight w that evaluation chose on validation
(DIR/msbr/<row>/knn_fusion.json): the ranking the row was measured with; `probability` is then the
softmax of those scores.

Shapes. Sessions are scored `batch_size` at a time as right-padded prefixes of `tables.prefix_width`
clicks (the last ones of a longer session), so one compiled function answers any number of sessions
of any length. `add_items` changes the number of items, so it compiles once more.

New items. An item outside the training catalogue has no trained ID embedding, so its item vector is
the content part alone, W c_v: c_v is its e_K from the K that wrote the model's export, or its MiniLM
embedding for the MiniLM export (`new_items.py`), normalised by the transform `msbr.content_norm`
fitted on the catalogue's export (its mean and whitening are kept, not refitted with the new rows:
refitting would move every catalogue item's input away from what W was trained on). The model's item
tables grow by rows whose ID embedding is zero, so new items can also be clicks of a session. Under
`msbr.knn_fusion` their unit embedding joins the kNN term as well: of the export the kNN term reads, so
a row whose kNN reads another export than its features (`transformer+minilm+tpad-knn`: MiniLM features,
TPAD's e_K) embeds each new item twice.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tpad_jax import export, layout, new_items, provenance, rows
from tpad_jax.cli import UserError
from tpad_jax.data import raw, readonly
from tpad_jax.downstream import features as features_lib
from tpad_jax.downstream import serving, tables
from tpad_jax.downstream import settings as settings_lib

DEFAULT_MODEL = "tpad"  # the method, never whichever row won validation: the others are comparison rows
DEFAULT_BATCH_SIZE = 64
NO_KNOWN_ITEM = "no item of this session is in the catalogue"


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """DIR/config.json, which every `runner.run` writes, as the ConfigDict the code reads.

    JSON has no tuples, so lists read back as tuples (configs hold no lists); nothing else is lost. The
    provenance records catch a config.json of other settings than a model was trained on: `load_selected`
    and `provenance.check_export` refuse it in one line.
    """
    path = layout.config_file(workdir)
    if not os.path.exists(path):
        raise UserError(f"{path}: missing (not a run directory?); pass the run's config")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(value):
    if isinstance(value, dict):
        return {key: _tuples(child) for key, child in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(child) for child in value)
    return value


def parse_session(session) -> tuple[str | None, list]:
    """(session id or None, item ids) of a list of item ids or a `{"session_id": ..., "items": [...]}` dict.

    Raises:
      UserError naming the field that is missing or of the wrong type.
    """
    session_id, items, field = None, session, ""
    if isinstance(session, dict):
        if "items" not in session:
            raise UserError("field 'items': missing")
        session_id, items, field = session.get("session_id"), session["items"], "field 'items': "
        if session_id is not None and not isinstance(session_id, str):
            raise UserError(f"field 'session_id': expected a string, got {type(session_id).__name__}")
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{field}expected a list of item id strings, got {type(items).__name__}")
    for item in items:
        if not isinstance(item, str):
            raise UserError(f"{field}expected item id strings, got {type(item).__name__}")
    return session_id, list(items)


@functools.partial(jax.jit, static_argnums=0)
def recommend_scores(graphdef, state, items, mask, knn=None):
    """Logits [B, N] of every item after each right-padded session, and their log-sum-exp [B].

    `knn`: (unit item vectors [N, d], weight, last click [B]) or None; with it every logit gains
    weight x cos(u[last click], u[v]), as evaluation ranked the row (`scoring.rank_examples`).
    """
    logits = nnx.merge(graphdef, state).scores(items, mask)
    if knn is not None:
        unit, weight, last = knn
        logits = logits + weight * (unit[last] @ unit.T)
    return logits, jax.nn.logsumexp(logits, axis=-1)


class Recommender:
    """One trained downstream row of a workdir, serving ranked next items for sessions."""

    def __init__(self, name: str, config, workdir: str, data, model, features, batch_size: int,
                 knn_weight: float | None = None, knn_features=None):
        """Use `from_workdir`. `features`: the exported content features the model reads (None: ID only).
        `knn_weight`: the `msbr.knn_fusion` weight evaluation chose (None: the row's scores alone).
        `knn_features`: the export its kNN term reads when that is not `features` (`rows.Row.knn`)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.name, self.config, self.batch_size = name, config, batch_size
        self.width = tables.prefix_width(config)
        self.item_ids, self.titles = list(data.item_ids), list(data.titles)
        self._row = {item_id: row for row, item_id in enumerate(self.item_ids)}
        self._workdir, self._data, self._model, self._features = workdir, data, model, features
        self._embedders, self._content_norm = {}, None  # export variant -> new_items.embedder
        self._knn_weight = knn_weight
        # On the device once: every scoring call reads the whole [N, d] table, which would otherwise be
        # copied from the host per call.
        self._knn_unit = None
        if knn_weight is not None:
            self._knn_unit = jnp.asarray(features_lib.normalise_content(
                features if knn_features is None else knn_features, "l2"))
        self._knn_other = knn_features is not None
        self._compile()

    @classmethod
    def from_workdir(cls, workdir: str, model: str = DEFAULT_MODEL, config=None,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> "Recommender":
        """Loads the finished row `model` of `workdir` and compiles its scorer.

        Args:
          config: the run's config; None reads DIR/config.json (`run_config`).
          batch_size: sessions per compiled call.
        Raises:
          UserError when the row is not trained, was interrupted, or was trained on other inputs.
        """
        serving.check_trained(workdir, model)  # before anything else: an untrained row costs nothing
        from_file = config is None
        config = run_config(workdir) if from_file else config
        try:
            data = readonly.load(config, workdir)
            features = features_lib.load_features(workdir, rows.neural_row(model).export, data)
            loaded = serving.load_selected(model, config, workdir, data, features)
            knn_weight = serving.fusion_weight(model, config, workdir, data)
            knn_variant = rows.knn_export_of(model)
            knn_features = (None if knn_weight is None or knn_variant == rows.neural_row(model).export
                            else features_lib.load_features(workdir, knn_variant, data))
        except AttributeError as error:  # a key the code reads that an older config.json lacks
            if not from_file:
                raise
            raise UserError(f"{layout.config_file(workdir)}: {str(error).splitlines()[0]} (written by "
                            "another version of the code); pass the run's config") from error
        return cls(model, config, workdir, data, loaded, features, batch_size, knn_weight, knn_features)

    @property
    def num_items(self) -> int:
        """Items that can be recommended: the catalogue and any added ones."""
        return len(self.item_ids)

    def check_k(self, k) -> int:
        """`k` when it is an integer from 1 to `num_items`, else UserError."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_items:
            raise UserError(f"top_k must be an integer from 1 to {self.num_items} (the number of items), "
                            f"got {k!r}")
        return int(k)

    def recommend(self, sessions, k: int = 20, exclude_seen: bool = True) -> list[dict]:
        """The `k` best next items of each session, best first.

        Args:
          sessions: item-id lists or `{"session_id": ..., "items": [...]}` dicts, clicks in order.
          exclude_seen: leave out the items of the session itself (then fewer than `k` come back only
            when the session holds more than `num_items - k` distinct items).
        Returns:
          One dict per session: `recommendations` [{item_id, title, score, probability}] (module
          docstring), `unknown_items` (ids not among the items, left out of the session), the
          `session_id` when one was given, and `error` when no item of the session is known.
        """
        k = self.check_k(k)
        results, known = [], []
        for index, session in enumerate(sessions):
            try:
                session_id, items = parse_session(session)
            except UserError as error:
                raise UserError(f"sessions[{index}]: {error}") from None
            result = {} if session_id is None else {"session_id": session_id}
            result["unknown_items"] = [item for item in items if item not in self._row]
            rows = np.array([self._row[item] for item in items if item in self._row], np.int32)
            if len(rows):
                known.append((index, rows))
            else:
                result.update(error=NO_KNOWN_ITEM, recommendations=[])
            results.append(result)
        for start in range(0, len(known), self.batch_size):
            chunk = known[start:start + self.batch_size]
            logits, log_norm = self._scores([rows for _, rows in chunk])
            for (index, rows), row_logits, row_log_norm in zip(chunk, logits, log_norm):
                results[index]["recommendations"] = self._best(row_logits, row_log_norm, k,
                                                               rows if exclude_seen else rows[:0])
        return results

    def add_items(self, source: str) -> list:
        """Makes items outside the catalogue recommendable, scored by their content; returns their ids.

        Args:
          source: a canonical items.jsonl (embedded now as the model's export was made: by its K, restored
            on the first call, or by MiniLM), or a directory that launch/embed_items.py wrote (checked to
            come from that K). A row whose kNN term reads another export than its features
            (`rows.Row.knn`) needs both embeddings of a new item, so it takes an items.jsonl only.
        Raises:
          UserError for an ID-only model, a bad record (`file:line: field`), an id the recommender
          already has, new items embedded by another K, or a directory for a row that needs two exports.
        """
        variant = new_items.content_export(self.name)
        knn_variant = rows.knn_export_of(self.name) if self._knn_other else None
        if os.path.isdir(source):
            if knn_variant is not None:
                raise UserError(f"{source}: a directory of new items holds one export's embeddings, but "
                                f"{self.name} reads two (features {variant}, kNN term {knn_variant}); pass "
                                "the items.jsonl, which is embedded for both")
            added, meta = new_items.load_new_items(source)
            expected = export.load_meta(layout.export_dir(self._workdir, variant)).get("inputs")
            if provenance.identity(meta.get("inputs")) != provenance.identity(expected):
                raise UserError(f"{source}: embedded by another model than the one that exported "
                                f"{layout.export_dir(self._workdir, variant)} "
                                f"({provenance.differences(meta.get('inputs'), expected)})")
            for item_id in added.item_ids:
                if item_id in self._row:
                    raise UserError(f"{source}/item_ids.json: item {item_id!r} is already one of the items")
            knn_embeddings = None
        else:
            items, lines = new_items.read_items(source)
            for item, line in zip(items, lines):
                if item.item_id in self._row:
                    raise raw.RawFormatError(source, line, "item_id", f"{item.item_id!r} is already one of "
                                             "the items")
            added = self._embed(variant, items, lines, source)
            knn_embeddings = None if knn_variant is None else self._embed(knn_variant, items, lines,
                                                                          source).embeddings
        self._grow(added.embeddings, knn_embeddings)
        self.item_ids += added.item_ids
        self.titles += added.titles
        self._row.update({item_id: row for row, item_id in enumerate(self.item_ids)})
        self._compile()
        return list(added.item_ids)

    # ------------------------------------------------------------------------------- internals

    def _embed(self, variant: str, items, lines, source: str) -> new_items.NewItems:
        """`items` embedded as the export of `variant` was (its embedder made on first use, then kept)."""
        if variant not in self._embedders:
            self._embedders[variant] = new_items.embedder(self.config, self._workdir, self._data, variant)
        return self._embedders[variant].embed(items, lines, source)

    def _grow(self, embeddings: np.ndarray, knn_embeddings: np.ndarray | None = None) -> None:
        """Appends items with a zero ID embedding and the catalogue-fitted normalisation of `embeddings`
        (`knn_embeddings`: their rows of the export the kNN term reads, when that is another)."""
        model = self._model
        if self._content_norm is None:  # fitted on the catalogue export once, whatever is added later
            # The row's own setting (`msbr.per_model`), of the row whose trained model this one ranks.
            norm = settings_lib.row_config(rows.trained_row(self.name), self.config).msbr.content_norm
            self._content_norm = features_lib.content_transform(self._features, norm)
        if model.id_embedding is not None:
            ids = model.id_embedding.embedding
            _append(ids, np.zeros((len(embeddings), ids.get_value().shape[1]), np.float32))
        if model.id_scale is not None:  # no train clicks: the ID (zero anyway) counts nothing
            _append(model.id_scale, np.zeros((len(embeddings), 1), np.float32))
        if model.item_bias is not None:
            _append(model.item_bias, np.full((len(embeddings), 1), self._new_item_bias(), np.float32))
        _append(model.content, self._content_norm(embeddings))
        unit = features_lib.normalise_content(embeddings, "l2")
        if model.similarity is not None:
            _append(model.similarity, unit)
        if self._knn_unit is not None:
            if knn_embeddings is not None:
                unit = features_lib.normalise_content(knn_embeddings, "l2")
            self._knn_unit = jnp.concatenate([self._knn_unit, jnp.asarray(unit, self._knn_unit.dtype)])

    def _new_item_bias(self) -> float:
        """The score bias a new item starts with: the mean of the catalogue's cold items' (< cold_threshold
        train clicks), the items whose evidence is closest to none; of all items when none is cold."""
        bias = np.asarray(self._model.item_bias.get_value())[:self._data.num_items, 0]
        cold = self._data.cold_mask(np.arange(self._data.num_items))
        return float(bias[cold].mean() if cold.any() else bias.mean())

    def _compile(self) -> None:
        """Splits the model with dropout off and compiles the scorer for its item count (one call)."""
        self._graphdef, self._state = nnx.split(nnx.view(self._model, deterministic=True))
        self._scores([])

    def _scores(self, prefixes):
        """(logits [n, N], log-sum-exp [n]) of up to `batch_size` prefixes, through one padded shape."""
        items, mask = tables.pad_prefixes(prefixes, self.width) if prefixes else (
            np.zeros((0, self.width), np.int32), np.zeros((0, self.width), bool))
        filler = self.batch_size - len(prefixes)
        items, mask = np.pad(items, ((0, filler), (0, 0))), np.pad(mask, ((0, filler), (0, 0)))
        knn = None
        if self._knn_weight is not None:
            last = np.array([prefix[-1] for prefix in prefixes] + [0] * filler, np.int32)
            knn = (self._knn_unit, np.float32(self._knn_weight), last)
        logits, log_norm = recommend_scores(self._graphdef, self._state, items, mask, knn)
        return np.asarray(logits)[:len(prefixes)], np.asarray(log_norm)[:len(prefixes)]

    def _best(self, logits: np.ndarray, log_norm: float, k: int, seen: np.ndarray) -> list[dict]:
        """The top `k` rows by logit (ties: lower row first) outside `seen`, as result records."""
        scores = logits.copy()
        scores[seen] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        if k == 0:
            return []
        # A stable sort of the rows that reach the k-th score: what a stable argsort of all rows gives.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero(scores >= kth)
        best = candidates[np.argsort(-scores[candidates], kind="stable")[:k]]
        return [{"item_id": self.item_ids[row], "title": self.titles[row], "score": float(logits[row]),
                 "probability": float(np.exp(logits[row] - log_norm))} for row in best.tolist()]


def _append(variable, rows) -> None:
    """Appends `rows` to a model variable's table (its shape grows; callers recompile)."""
    table = variable.get_value()
    variable.set_value(jnp.concatenate([table, jnp.asarray(rows, table.dtype)]))
