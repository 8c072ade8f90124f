"""Ranking with a trained downstream model: targets after prefixes, chunk by chunk, dropout off."""

import numpy as np
from flax import nnx

from tpad_jax.downstream.tables import pad_prefixes
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
