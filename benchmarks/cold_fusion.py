"""What cold-target HR@20 costs: a trained row's scores fused with e_K similarity for cold items (issue 15).

    python benchmarks/cold_fusion.py --workdir RUN [--config configs/tpad_base.py] [--preset base]
        [--weights 0,0.5,1,2,4,8] [--items cold|all] [--knn_export tpad] [--set KEY=VALUE ...] [--no-record]

RUN is a finished run (read only; `--ranks_out` writes elsewhere); `--set` passes the run's own settings
(e.g. `--set data.raw_dir=../shared/data/amazon2014_beauty --set seed=1`). For each trained content row, every
validation and test prefix is scored as the row scores it plus w * cos(e[last click], e[v]) for the items
v with fewer than `data.cold_threshold` train clicks (e: the row's export; 0 for warm items), for each
weight w. This is score fusion that leans on the export exactly where IDs are weak. `--items all` fuses
the cosine into every item's score instead: the row plus its own export's item-kNN. Printed per row and
weight: validation and test HR@20, MRR@20 and cold-target HR@20, and the weight the config's
`msbr.knn_fusion_metric` (HR@20 or MRR@20) would choose on validation; appended to RESULTS.md. It
shows how far cold HR@20 moves when bought with overall accuracy, and whether the export of TPAD buys
more of it than the others' at the same weight. `--knn_export VARIANT` fuses every row with that one
export's cosine instead of its own (e.g. the stage-1 row with TPAD's e_K): whether a gain lies in the
export's similarity or in the row trained over it. Such a row is named
`<row>@<variant>`, in the table and in `--ranks_out`.
"""

import argparse
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import ROOT, apply_overrides, emit_row, print_and_record
from train_step import load_config
from tpad_jax import layout, rows
from tpad_jax.data import readonly
from tpad_jax.downstream import features, scoring, serving, tables
from tpad_jax.eval import metrics, report

COLUMNS = ["run", "row", "weight", "valid HR@20", "valid MRR@20", "valid cold HR@20", "test HR@20",
           "test MRR@20", "test cold HR@20", "chosen on valid", "machine"]
SECTION = "Cold-item score fusion"
NOTE = ("`python benchmarks/cold_fusion.py --config configs/tpad_base.py --workdir RUN`: a finished run's "
        "content rows, scores + weight x cos(e[last click], e[v]) for cold items v (< `data.cold_threshold` "
        "train clicks), e the row's export; `chosen on valid`: the weight of best validation "
        "`msbr.knn_fusion_metric` (HR@20 or MRR@20; the config's).")
VALID_INDEX = {("HR", 20): 0, ("MRR", 20): 1}  # where fused_metrics puts each metric the choice may read


def session_vectors(model, prefixes, width: int, batch: int) -> np.ndarray:
    """Session vectors [n, d] of `prefixes` (dropout off), `batch` at a time at the full width."""
    eval_model = nnx.view(model, deterministic=True)
    call = nnx.jit(lambda m, items, mask: m(items, mask))
    chunks = [np.asarray(call(eval_model, *tables.pad_prefixes(prefixes[start:start + batch], width)))
              for start in range(0, len(prefixes), batch)]
    return np.concatenate(chunks)


def fused_metrics(vectors, table, unit, cold_items, prefixes, targets, cold_targets, weight: float):
    """((HR@20, MRR@20, cold HR@20), ranks) of scores vectors @ table.T + weight * cold_v * cos(last, v),
    ranked as one dot product: [h ; weight * u_last] . [x_v ; cold_v * u_v]."""
    last = np.array([prefix[-1] for prefix in prefixes])
    queries = np.concatenate([vectors, weight * unit[last]], axis=1)
    items = np.concatenate([table, cold_items[:, None] * unit], axis=1)
    ranks = np.asarray(metrics.rank_by_dot(jnp.asarray(queries), jnp.asarray(items), jnp.asarray(targets)))
    every, cold = metrics.metrics_from_ranks(ranks, (20,)), metrics.metrics_from_ranks(ranks[cold_targets], (20,))
    return (every[("HR", 20)], every[("MRR", 20)], cold[("HR", 20)]), ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_base.py"))
    parser.add_argument("--preset", default=None, help="the config file's argument (e.g. full)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--weights", default="0,0.5,1,2,4,8")
    parser.add_argument("--items", choices=("cold", "all"), default="cold",
                        help="the items whose score gains the cosine term")
    parser.add_argument("--knn_export", default=None, metavar="VARIANT",
                        help="fuse every row with this export's cosine (default: each row's own export)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="the run's config overrides")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--ranks_out", default=None, metavar="DIR",
                        help="write each row's test ranks at its chosen weight to DIR/results/ranks.npz, for "
                             "the paired tests of benchmarks/seed_compare.py (DIR: OUT/seed<s> per seed)")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config, args.preset), args.set)
    data = readonly.load(config, args.workdir)
    weights = [float(w) for w in args.weights.split(",")]
    metric = scoring.fusion_metric(config)
    if metric not in VALID_INDEX:
        parser.error(f"msbr.knn_fusion_metric={scoring.metric_label(metric)}: this benchmark chooses by HR@20 "
                     "or MRR@20")
    cold_items = (data.train_item_counts < data.cold_threshold).astype(np.float32)
    if args.items == "all":
        cold_items = np.ones_like(cold_items)
    width, batch = tables.prefix_width(config), config.msbr.eval_batch_size
    results = []
    for row in rows.neural():
        if row.export is None or not os.path.exists(layout.best_params_file(args.workdir, row.name)):
            continue
        model = serving.load_selected(row.name, config, args.workdir, data)
        table = np.asarray(nnx.view(model, deterministic=True).item_table())
        knn_export = args.knn_export or row.export
        name = row.name if args.knn_export is None else f"{row.name}@{knn_export}"
        unit = features.normalise_content(features.load_features(args.workdir, knn_export, data), "l2")
        measured, test_ranks = {}, {}
        for split in ("valid", "test"):
            prefixes, targets = data.examples(split)
            vectors = session_vectors(model, prefixes, width, batch)
            for weight in weights:
                measured[split, weight], ranks = fused_metrics(vectors, table, unit, cold_items, prefixes,
                                                               targets, data.cold_mask(targets), weight)
                if split == "test":
                    test_ranks[weight] = ranks
        chosen = scoring.choose_weight({w: measured["valid", w][VALID_INDEX[metric]] for w in weights})
        if args.ranks_out:
            _, targets = data.examples("test")
            report.write_ranks({name: test_ranks[chosen]}, data.cold_mask(targets),
                               layout.results_dir(args.ranks_out))
        for weight in weights:
            values = measured["valid", weight] + measured["test", weight]
            results.append(emit_row("cold_fusion", {
                "run": os.path.basename(os.path.normpath(args.workdir)), "row": name,
                "weight": weight if args.items == "cold" else f"{weight} (all items)",
                **{column: round(v, 2) for column, v in zip(COLUMNS[3:9], values)},
                "chosen on valid": weight == chosen}))
    print_and_record(SECTION, COLUMNS, results, NOTE, record=not args.no_record)


if __name__ == "__main__":
    main()
