"""Stage 1's learning rate chosen on the validation probe (issue 15 §3: choices on validation only).

    python benchmarks/stage1_rates.py --config configs/tpad_smollm2.py --workdir DIR \
        --set data.raw_dir=../shared/data/amazon2014_beauty [--rates 1e-4,5e-4,2e-3] [--eval_every 30] \
        [--no-record]

A pretrained base comes with knowledge of the titles that stage 1 can destroy as well as build on: on
Amazon Beauty the SmolLM2 preset's shipped rate lowers the retrieval probe below the untrained towers'.
For each rate, stage 1 runs as configured except for its learning rate (in DIR/lr<rate>/, every rate
reading the data prepared once in DIR/data), probing validation every `--eval_every` steps (next-item
retrieval by e_K cosine to the last click, `stages.probe_eval`). The untrained towers (what stage 1
starts from) are probed too, as the floor a rate has to clear.

The table: validation HR@20 at each probed step, then at the last step validation HR@20, cold HR@20 and
MRR@20, and the same on test. Choose on the validation columns; test is there for the record only.
Each rate's stage 1 resumes from its checkpoints when the command is run again.
"""

import argparse
import json
import os

import numpy as np

from common import ROOT, apply_overrides, emit_row, record_rows
from train_step import load_config
from tpad_jax import export, layout, rows, runner
from tpad_jax.data import prepared
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.train import inputs as inputs_lib
from tpad_jax.train import stages

SECTION = "Stage 1's learning rate on the validation probe"
NOTE = ("`python benchmarks/stage1_rates.py --config CONFIG --workdir DIR --set data.raw_dir=CATALOGUE`: "
        "stage 1 as configured but for its learning rate; `valid@S` = validation probe HR@20 (e_K cosine "
        "to the last click) after S steps; the last six columns after the last step. `untrained` = the "
        "towers stage 1 starts from. Chosen on validation; test only for the record.")


def probe(model, data, split: str, batch_size: int) -> dict:
    """HR@20 and MRR@20 of the e_K retrieval probe on `split`, over all targets and the cold ones."""
    ranks = np.asarray(export.retrieval_ranks(export.item_embeddings(model, batch_size), data, split, batch_size))
    _, targets = data.examples(split)
    cold = data.cold_mask(targets)
    every = metrics_lib.metrics_from_ranks(ranks, (20,))
    on_cold = metrics_lib.metrics_from_ranks(ranks[cold], (20,))[("HR", 20)] if cold.any() else float("nan")
    return {f"{split} HR@20": every[("HR", 20)], f"{split} cold HR@20": on_cold,
            f"{split} MRR@20": every[("MRR", 20)]}


def probed_steps(rate_dir: str) -> dict[int, float]:
    """{step: validation probe HR@20} from the stage's metrics log."""
    found = {}
    with open(os.path.join(layout.stage_dir(rate_dir, rows.STAGE1), "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval/probe_hr20" in record:
                found[record["step"]] = record["eval/probe_hr20"]
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_smollm2.py"))
    parser.add_argument("--preset", default=None, help="the config file's argument")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rates", default="1e-4,5e-4,2e-3")
    parser.add_argument("--eval_every", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    config = apply_overrides(load_config(args.config, args.preset), args.set)
    config.train.eval_every = args.eval_every
    config.stage1.keep_best = False  # the columns after the last step are the last step's, whatever the preset keeps
    data = prepared.load_or_prepare(config, args.workdir)
    batch = config.eval.batch_size
    steps = list(range(args.eval_every, config.stage1.steps + 1, args.eval_every))
    columns = ["rate"] + [f"valid@{step}" for step in steps] + [
        f"{split} {metric}" for split in ("valid", "test") for metric in ("HR@20", "cold HR@20", "MRR@20")]

    inputs = inputs_lib.build_inputs(config, args.workdir, data)
    untrained = inputs.make_model()
    inputs.initialize(untrained)
    results = [emit_row("stage1_rates", {"rate": "untrained", **probe(untrained, data, "valid", batch),
                                         **probe(untrained, data, "test", batch)})]
    del untrained
    for rate in [float(text) for text in args.rates.split(",")]:
        rate_dir = os.path.join(args.workdir, f"lr{rate:g}")
        os.makedirs(rate_dir, exist_ok=True)
        if not os.path.exists(os.path.join(rate_dir, "data")):
            os.symlink(os.path.abspath(os.path.join(args.workdir, "data")), os.path.join(rate_dir, "data"))
        rate_config = config.copy_and_resolve_references()
        rate_config.stage1.learning_rate = rate
        rate_inputs = inputs_lib.build_inputs(rate_config, rate_dir, data)
        runner.claim_stage(rate_inputs, rows.STAGE1)
        model = stages.run_stage1(rate_inputs)
        trajectory = probed_steps(rate_dir)
        results.append(emit_row("stage1_rates", {
            "rate": f"{rate:g}", **{f"valid@{step}": trajectory.get(step, "") for step in steps},
            **probe(model, data, "valid", batch), **probe(model, data, "test", batch)}))
    table = [{column: row.get(column, "") for column in columns} for row in results]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    if not args.no_record:
        for row in table:
            row["config"] = os.path.basename(args.config)
        record_rows(SECTION, ["config"] + columns + ["machine"], table, note=NOTE)


if __name__ == "__main__":
    main()
