"""Evaluation on the test split: baselines and trained downstream rows ranked in chunks, then the report.

A driver above train and eval: it trains a downstream row that is not finished yet (`downstream`).
"""

import os
import time

import numpy as np

from tpad_jax import cli, export, layout, provenance, rows
from tpad_jax.data import prepared, readonly
from tpad_jax.eval import baselines, metrics, report

TEST_SPLIT = "test"
NO_ORACLE = "only synthetic data knows the true next-item distribution"


def configured_models(config) -> list[str]:
    """`config.eval.models` as names: the command line `--config.eval.models=a,b` gives the tuple
    ("a,b",), so every entry is split on commas."""
    return [name.strip() for entry in config.eval.models for name in entry.split(",") if name.strip()]


def expand_models(spec: str, config) -> list[str]:
    """Model names from a comma list, with `baselines` and `all` expanded and duplicates dropped."""
    configured = configured_models(config)
    names = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        names.extend({"baselines": rows.names(rows.session_baselines()), "all": configured}.get(name, (name,)))
    known = set(rows.names(rows.baselines())) | set(configured)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise cli.UserError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, "
                         "or the groups 'baselines' and 'all'")
    return list(dict.fromkeys(names))


def runnable_models(names, data) -> tuple[list[str], dict[str, str]]:
    """Splits model `names` into those `data` can rank and {model: why it is skipped}, in order.

    The oracle needs the synthetic generator; the content rows need a catalogue with content (an
    ID-only catalogue has no title or image for the towers to read).
    """
    runnable, skipped = [], {}
    for name in names:
        if name == rows.ORACLE and data.source != "synthetic":
            skipped[name] = NO_ORACLE
        elif not data.has_content and rows.export_of(name) is not None:
            skipped[name] = f"{prepared.NO_CONTENT}: the towers are not built"
        else:
            runnable.append(name)
    return runnable, skipped


def check_exports(names, config, workdir: str, data) -> None:
    """Raises UserError, before any model is ranked, when a content row among `names` would read an
    export made from other inputs than `config` and the prepared data (`provenance.check_export`)."""
    for name in names:
        for variant in dict.fromkeys((rows.export_of(name), rows.knn_export_of(name))):
            if variant and export.is_complete(layout.export_dir(workdir, variant)):
                provenance.check_export(layout.export_dir(workdir, variant), config, data.fingerprint)


def rank_model(name: str, config, workdir: str, data, prefixes, targets) -> np.ndarray:
    """Test ranks of one model that `runnable_models` lets run on `data`."""
    batch_size = config.eval.batch_size
    if name == rows.ORACLE:
        # The oracle's rows follow the examples, so its chunks are indexed by example position.
        oracle = baselines.Oracle(data.oracle_scores(TEST_SPLIT))
        return metrics.rank_targets(oracle.score, np.arange(len(targets)), targets, batch_size)
    if name in rows.names(rows.baselines()):
        if rows.export_of(name) is not None:  # a content item-kNN row: the export's retrieval probe
            from tpad_jax.downstream import features  # noqa: PLC0415

            embeddings = features.load_features(workdir, rows.export_of(name), data)
            return export.retrieval_ranks(embeddings, data, TEST_SPLIT, batch_size)
        model = baselines.make_baseline(name, config).fit(data.train, data.num_items)
        return metrics.rank_targets(model.score, prefixes, targets, batch_size)
    from tpad_jax.downstream import training  # noqa: PLC0415 (only neural models need the training stack)

    return np.asarray(training.evaluate_neural(name, config, workdir, data))


def run(config, workdir: str, models: str) -> list[dict]:
    """Evaluates the `--models` spec on the test split and writes DIR/results/.

    Returns:
      All rows of the updated results.csv.
    """
    names = expand_models(models, config)
    # Prepared only into a workdir that has none: the data of finished work is never replaced here.
    data = readonly.load(config, workdir) if readonly.has_prepared(workdir) else \
        prepared.load_or_prepare(config, workdir)
    names, skipped = runnable_models(names, data)
    check_exports(names, config, workdir, data)
    prefixes, targets = data.examples(TEST_SPLIT)
    cold_mask = data.cold_mask(targets)
    print(f"test examples: {len(targets)} ({int(np.sum(cold_mask))} with cold targets), "
          f"items: {data.num_items}; split {data.stats.get('split', 'by time')}")
    for line in report.skipped_lines(skipped):
        print(f"skipped {line}")
    rows, ranks_of = [], {}
    for name in names:
        start = time.perf_counter()
        ranks = rank_model(name, config, workdir, data, prefixes, targets)
        if ranks.shape != targets.shape:
            raise ValueError(f"{name}: {ranks.shape[0]} ranks for {targets.shape[0]} test examples")
        rows.extend(metrics.slice_rows(name, ranks, cold_mask, tuple(config.eval.ks)))
        ranks_of[name] = ranks
        print(f"{name}: ranked in {time.perf_counter() - start:.1f} s")
    results_dir = layout.results_dir(workdir)
    provenance.claim_results(workdir, data.fingerprint)
    merged = report.write_results(rows, results_dir, skipped)
    report.write_ranks(ranks_of, cold_mask, results_dir)
    with open(os.path.join(results_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())  # what write_results rendered, epochs and skipped rows included
    return merged
