"""Full-ranking metrics: target ranks on device, chunk by chunk, then HR / MRR / NDCG in percent."""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METRICS = ("HR", "MRR", "NDCG")
SLICES = ("all", "cold", "warm")


@jax.jit
def ranks_from_scores(scores, targets):
    """0-based rank of each target among all items, with the pessimistic tie rule.

    A target tied with other items is ranked below all of them:
    `rank = #{score > s_t} + #{score == s_t} - 1`, so no model gains from ties (a constant scorer ranks
    every target last). NaN scores count as -inf, so a NaN target score is ranked last too.

    Args:
      scores: float [b, N], higher is better.
      targets: int [b], item rows in [0, N).
    Returns:
      int32 [b] ranks in [0, N).
    """
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    target_scores = jnp.take_along_axis(scores, targets[:, None].astype(jnp.int32), axis=1)
    return (jnp.sum(scores >= target_scores, axis=1) - 1).astype(jnp.int32)


def rank_targets(score_fn: Callable, prefixes: Sequence, targets, batch_size: int) -> np.ndarray:
    """Ranks every target chunk by chunk, so only [batch_size, N] scores exist at any time.

    Args:
      score_fn: maps a chunk `prefixes[i:i + batch_size]` to scores [chunk, N] (device or numpy array).
      prefixes: anything sliceable with one entry per example (prefix arrays, or example indices).
      targets: int [num_examples] target item rows.
      batch_size: examples per chunk.
    Returns:
      int32 [num_examples] ranks on host.
    """
    targets = np.asarray(targets, dtype=np.int32)
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    ranks = []
    for start in range(0, len(targets), batch_size):
        scores = score_fn(prefixes[start:start + batch_size])
        chunk_targets = targets[start:start + batch_size]
        if scores.shape[0] != len(chunk_targets):
            raise ValueError(f"score_fn returned {scores.shape[0]} rows for {len(chunk_targets)} prefixes")
        ranks.append(np.asarray(ranks_from_scores(scores, chunk_targets)))
    return np.concatenate(ranks) if ranks else np.zeros((0,), np.int32)


def _dot_scores(session_vecs, rows):
    """[b, r] scores `session_vecs @ rows.T`, NaN as -inf (the rule of `ranks_from_scores`)."""
    scores = lax.dot_general(session_vecs, rows, (((1,), (1,)), ((), ())))
    return jnp.where(jnp.isnan(scores), -jnp.inf, scores)


@functools.partial(jax.jit, static_argnames="item_chunk")
def rank_by_dot(session_vecs, item_table, targets, item_chunk: int = 4096):
    """`ranks_from_scores(session_vecs @ item_table.T, targets)` without the [b, N] score matrix.

    Scores are computed `item_chunk` items at a time and only counted against the target scores, so
    memory is bounded by b x (b + item_chunk) whatever the catalogue size (1M items x 256 sessions
    would be 1 GB of scores). Same pessimistic tie rule and NaN rule as `ranks_from_scores`.

    Each chunk's dot also scores the b target rows, so a target's score comes out of the same dot as
    the scores it is compared with: a dot's last bit can depend on its shape (XLA CPU's small-matrix
    code), and a target tied with an identical item vector must still count the tie. The target itself
    is excluded by its index, so rounding can never push a rank outside [0, N).

    Args:
      session_vecs: float [b, d].
      item_table: float [N, d].
      targets: int [b], item rows in [0, N).
      item_chunk: items scored per step (static); clipped to N.
    Returns:
      int32 [b] ranks in [0, N).
    """
    num_items = item_table.shape[0]
    item_chunk = min(item_chunk, num_items)
    targets = targets.astype(jnp.int32)
    target_rows = item_table[targets]
    diagonal = jnp.arange(targets.shape[0])

    def count_chunk(index, counts):
        # The last chunk is moved back to end at N instead of padding the table (a copy of all of it);
        # the items it shares with the previous chunk are masked out.
        start = jnp.minimum(index * item_chunk, num_items - item_chunk)
        rows = lax.dynamic_slice_in_dim(item_table, start, item_chunk)
        scores = _dot_scores(session_vecs, jnp.concatenate([target_rows, rows]))
        target_scores = scores[diagonal, diagonal]
        items = start + jnp.arange(item_chunk)
        counted = (items >= index * item_chunk)[None, :] & (items[None, :] != targets[:, None])
        above = scores[:, targets.shape[0]:] >= target_scores[:, None]
        return counts + jnp.sum(counted & above, axis=1, dtype=jnp.int32)

    num_chunks = -(-num_items // item_chunk)
    return lax.fori_loop(0, num_chunks, count_chunk, jnp.zeros(targets.shape, jnp.int32))


def metrics_from_ranks(ranks, ks=(1, 5, 10, 20)) -> dict[tuple[str, int], float]:
    """HR@K, MRR@K and NDCG@K averaged over examples, in percent.

    HR@K = [rank < K]; MRR@K = 1/(rank+1) if rank < K else 0; NDCG@K = 1/log2(rank+2) if rank < K else 0.

    Args:
      ranks: int [num_examples] 0-based ranks (at least one).
      ks: cut-offs.
    Returns:
      {(metric, k): value in %} for metric in HR, MRR, NDCG and k in ks.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("metrics_from_ranks needs at least one rank")
    out = {}
    for k in ks:
        hit = ranks < k
        out[("HR", k)] = 100.0 * float(np.mean(hit))
        out[("MRR", k)] = 100.0 * float(np.mean(np.where(hit, 1.0 / (ranks + 1.0), 0.0)))
        out[("NDCG", k)] = 100.0 * float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)))
    return out


def slice_rows(model: str, ranks, cold_mask, ks=(1, 5, 10, 20)) -> list[dict]:
    """Result rows (model, slice, metric, k, value) for the slices all / cold / warm.

    A slice without examples (e.g. no cold targets) has no rows; the report shows it as missing.

    Args:
      model: the row label.
      ranks: int [num_examples] 0-based ranks.
      cold_mask: bool [num_examples], True where the target is a cold item.
      ks: cut-offs.
    """
    ranks = np.asarray(ranks)
    cold_mask = np.asarray(cold_mask, dtype=bool)
    if cold_mask.shape != ranks.shape:
        raise ValueError(f"cold_mask shape {cold_mask.shape} != ranks shape {ranks.shape}")
    selections = {"all": np.ones_like(cold_mask), "cold": cold_mask, "warm": ~cold_mask}
    rows = []
    for slice_name in SLICES:
        selected = ranks[selections[slice_name]]
        if selected.size == 0:
            continue
        values = metrics_from_ranks(selected, ks)
        rows.extend(
            {"model": model, "slice": slice_name, "metric": metric, "k": k, "value": values[(metric, k)]}
            for metric in METRICS for k in ks)
    return rows
