"""Full-ranking metrics: target ranks on device, chunk by chunk, then HR / MRR / NDCG in percent."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
