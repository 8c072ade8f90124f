"""Ranking with a trained downstream model: targets after prefixes, chunk by chunk, dropout off."""

import numpy as np
from flax import nnx

from tpad_jax.downstream.tables import bucket_widths, pad_prefixes, prefix_width
from tpad_jax.eval import metrics as metrics_lib


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


def _padded_rows(rows: int, batch_size: int) -> int:
    """Rows a chunk of `rows` prefixes is padded to: a multiple of batch_size / 8, at most batch_size, so
    a bucket's last chunk is not run at the full batch and each ranking sees a few compiled shapes."""
    quantum = max(batch_size // 8, 1)
    return min(batch_size, -(-rows // quantum) * quantum)


def rank_examples(model, prefixes, targets, width: int, batch_size: int, buckets=(), knn=None) -> np.ndarray:
    """0-based ranks [n] of `targets` after `prefixes` (dropout off), `batch_size` prefixes at a time.

    `knn`: (unit item vectors [N, d], weight w) or None. With it the score of item v gains
    w x cos(u[last click], u[v]): the row fused with its export's item-kNN (`msbr.knn_fusion`), ranked as
    one dot product [h ; w u_last] . [x_v ; u_v].

    Prefixes are grouped by length into the widths `buckets` (then `width`), as training batches are
    (`msbr.length_buckets`): most prefixes are short, and an encoder reads right-padded prefixes the same
    at any width, so a short one is not run at the full width. Scores are session vectors times item
    vectors, so targets are ranked item chunk by item chunk (`metrics.rank_by_dot`): memory stays bounded
    by the chunk sizes, not by the catalogue.
    """
    unit, weights = (None, (None,)) if knn is None else (knn[0], (float(knn[1]),))
    return _ranks_at(model, prefixes, targets, width, batch_size, buckets, unit, weights)[weights[0]]


def _ranks_at(model, prefixes, targets, width: int, batch_size: int, buckets, unit, weights) -> dict:
    """{weight: ranks [n]} as `rank_examples` ranks them fused at each of `weights` (unit None: the row
    alone, weights (None,)); each chunk of prefixes is encoded once for all the weights."""
    targets = np.asarray(targets, np.int32)
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    eval_model = nnx.view(model, deterministic=True)
    table = _item_table(eval_model)
    if unit is not None:
        unit = np.asarray(unit, np.float32)
        table = np.concatenate([np.asarray(table), unit], axis=1)
    widths = bucket_widths(buckets, width)
    lengths = np.array([min(len(prefix), width) for prefix in prefixes], np.int64)
    bucket_of = np.searchsorted(np.asarray(widths), lengths)
    ranks = {weight: np.zeros(len(targets), np.int32) for weight in weights}
    for bucket, bucket_width in enumerate(widths):
        members = np.flatnonzero(bucket_of == bucket)
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            padded = _padded_rows(len(rows), batch_size)
            items, mask = _padded_chunk([prefixes[i] for i in rows], bucket_width, padded)
            vectors = _session_vectors(eval_model, items, mask)
            # Filler rows rank item 0 and are dropped: one compiled shape per padded chunk size.
            chunk_targets = np.pad(targets[rows], (0, padded - len(rows)))
            if unit is not None:
                last = np.array([prefixes[i][-1] for i in rows] + [0] * (padded - len(rows)))
            for weight in weights:
                queries = vectors if unit is None else np.concatenate([np.asarray(vectors), weight * unit[last]],
                                                                      axis=1)
                ranked = metrics_lib.rank_by_dot(queries, table, chunk_targets)
                ranks[weight][rows] = np.asarray(ranked)[:len(rows)]
    return ranks


def rank_split(model, config, prefixes, targets, knn=None) -> np.ndarray:
    """`rank_examples` as validation and testing run it: the row's width, `msbr.eval_batch_size` and
    `msbr.length_buckets` of `config` (`knn`: as there)."""
    msbr = config.msbr
    return rank_examples(model, prefixes, targets, prefix_width(config), msbr.eval_batch_size,
                         msbr.length_buckets, knn)


def fused_ranks(model, config, prefixes, targets, unit, weights) -> dict:
    """{weight: `rank_split(..., knn=(unit, weight))`} for every fusion weight, each session encoded once."""
    msbr = config.msbr
    return _ranks_at(model, prefixes, targets, prefix_width(config), msbr.eval_batch_size, msbr.length_buckets,
                     unit, tuple(float(weight) for weight in weights))


def fusion_weights(config) -> tuple[float, ...]:
    """`msbr.knn_fusion` as floats: the command line `--config.msbr.knn_fusion=0,4,16` gives ("0,4,16",), so
    every entry is split on commas; UserError for an entry that is not a number."""
    from tpad_jax.cli import UserError  # noqa: PLC0415

    weights = []
    for part in (p.strip() for entry in config.msbr.get("knn_fusion", ()) for p in str(entry).split(",")):
        if not part:
            continue
        try:
            weights.append(float(part))
        except ValueError:
            raise UserError(f"msbr.knn_fusion: {part!r} is not a number; give weights like 0,4,16") from None
    return tuple(weights)


FUSION_METRICS = ("HR", "MRR", "NDCG")  # what `msbr.knn_fusion_metric` may name, at any cut-off


def fusion_metric(config) -> tuple[str, int]:
    """`msbr.knn_fusion_metric` ("HR@20", the default "MRR@20") as (metric, k): the validation metric that
    chooses the fusion weight; UserError for a name that is not one of FUSION_METRICS at a positive cut-off."""
    from tpad_jax.cli import UserError  # noqa: PLC0415

    text = str(config.msbr.get("knn_fusion_metric", "MRR@20")).strip()
    name, _, k = text.partition("@")
    if name.upper() not in FUSION_METRICS or not k.isdigit() or int(k) < 1:
        raise UserError(f"msbr.knn_fusion_metric: {text!r} is not a metric like HR@20; choose "
                        f"{', '.join(FUSION_METRICS)} at a cut-off")
    return name.upper(), int(k)


def metric_label(metric: tuple[str, int]) -> str:
    return f"{metric[0]}@{metric[1]}"


def choose_weight(valid_of: dict) -> float:
    """The fusion weight of the best validation value in {weight: value}; a tie goes to the smaller weight."""
    return max(sorted(valid_of), key=lambda weight: valid_of[weight])
