"""Evaluation on the test split: baselines and trained models ranked in chunks, then the report."""

import os
import time

import numpy as np

from tpad_jax import cli
from tpad_jax.data import prepared
from tpad_jax.eval import baselines, metrics, report

BASELINE_MODELS = ("oracle",) + baselines.BASELINE_NAMES
TEST_SPLIT = "test"


def configured_models(config) -> list[str]:
    """`config.eval.models` as names: the command line `--config.eval.models=a,b` gives the tuple
    ("a,b",), so every entry is split on commas."""
    return [name.strip() for entry in config.eval.models for name in entry.split(",") if name.strip()]


def expand_models(spec: str, config) -> list[str]:
    """Model names from a comma list, with `baselines` and `all` expanded and duplicates dropped."""
    configured = configured_models(config)
    names = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        names.extend({"baselines": BASELINE_MODELS, "all": configured}.get(name, (name,)))
    known = set(BASELINE_MODELS) | set(configured)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise cli.UserError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, "
                         "or the groups 'baselines' and 'all'")
    return list(dict.fromkeys(names))


def rank_model(name: str, config, workdir: str, data, prefixes, targets) -> np.ndarray | None:
    """Test ranks of one model; None for the oracle on data without a known generator."""
    batch_size = config.eval.batch_size
    if name == "oracle":
        scores = data.oracle_scores(TEST_SPLIT)
        if scores is None:
            return None
        # The oracle's rows follow the examples, so its chunks are indexed by example position.
        oracle = baselines.Oracle(scores)
        return metrics.rank_targets(oracle.score, np.arange(len(targets)), targets, batch_size)
    if name in baselines.BASELINE_NAMES:
        model = baselines.make_baseline(name, config).fit(data.train, data.num_items)
        return metrics.rank_targets(model.score, prefixes, targets, batch_size)
    from tpad_jax.train import msbr  # noqa: PLC0415 (only neural models need the training stack)

    return np.asarray(msbr.evaluate_neural(name, config, workdir, data))


def run(config, workdir: str, models: str) -> list[dict]:
    """Evaluates the `--models` spec on the test split and writes DIR/results/.

    Returns:
      All rows of the updated results.csv.
    """
    names = expand_models(models, config)
    data = prepared.load_or_prepare(config, workdir)
    prefixes, targets = data.examples(TEST_SPLIT)
    cold_mask = data.cold_mask(targets)
    print(f"test examples: {len(targets)} ({int(np.sum(cold_mask))} with cold targets), "
          f"items: {data.num_items}")
    rows, ranks_of = [], {}
    for name in names:
        start = time.perf_counter()
        ranks = rank_model(name, config, workdir, data, prefixes, targets)
        if ranks is None:
            print(f"{name}: skipped (only synthetic data knows the true next-item distribution)")
            continue
        if ranks.shape != targets.shape:
            raise ValueError(f"{name}: {ranks.shape[0]} ranks for {targets.shape[0]} test examples")
        rows.extend(metrics.slice_rows(name, ranks, cold_mask, tuple(config.eval.ks)))
        ranks_of[name] = ranks
        print(f"{name}: ranked in {time.perf_counter() - start:.1f} s")
    merged = report.write_results(rows, os.path.join(workdir, "results"))
    report.write_ranks(ranks_of, cold_mask, os.path.join(workdir, "results"))
    print(report.markdown_tables(merged))
    return merged
