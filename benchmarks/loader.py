"""Input-pipeline throughput (batches/s) of the Grain pipelines the TPAD stages read, against the train
step's consumption rate.

    python benchmarks/loader.py --config configs/tpad_base.py [--no-record]   # on a quiet machine
    python benchmarks/loader.py --config configs/tpad_base.py:tiny --step_json steps.jsonl

The synthetic data is prepared into `--workdir` (default <tempdir>/tpad_bench_<preset>) as a run prepares
it (prepared.load_or_prepare, the tokenizer, the TFDS item table); later calls reuse it. Measured, at the
config's per-process batch sizes and for each of `--workers` (config.data.worker_count; 0 = in-process):

    session_batches   stage 2's training batches (a session prompt assembled per example)
    item_row_batches  stage 1's training batches (rows only: prompts and ViT features live on device)
    item_batches      item prompts with images decoded from the TFDS ArrayRecord table: the stream the
                      frozen ViT's one pass over the catalogue reads (compared with stage 1's batch size)
A pipeline's rate is `--window` batches / the median time of `--windows` windows, after `--warmup`
windows (the first includes starting the iterator and its workers).

Step times, to compare with: `--step_seconds stage2=0.43,stage1=0.21`, or `--step_json FILE` holding the
output of benchmarks/train_step.py: each JSON line with a "stage" ("stage1" / "stage2", or 1 / 2) and a
"step_s" (seconds of one train step) counts, the last one per stage wins; other lines are skipped.
`headroom = loader batches/s x step_s` is how many times faster the loader makes batches than the step
consumes them; the goal is >= 5, so the step never waits on input.
"""

import json
import os
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from common import append_results, emit, machine, median_time
from tpad_jax import pretrained
from tpad_jax.data import pipeline, prepared, tfds_builder, tokenizer as tokenizer_lib

STAGES = ("stage1", "stage2")
PIPELINES = ("session_batches", "item_row_batches", "item_batches")
STAGE_OF = {"session_batches": "stage2", "item_row_batches": "stage1", "item_batches": "stage1"}
HEADROOM_GOAL = 5.0
COLUMNS = ["preset", "pipeline", "batch", "workers", "batches/s", "examples/s", "first window s",
           "step s", "headroom", "machine"]
NOTE = ("`python benchmarks/loader.py --config configs/tpad_base.py` (run alone: timings need a quiet "
        "machine): Grain batches/s at the config's per-process batch sizes, median of "
        "timed windows after warm-up; workers = `data.worker_count` (mp_prefetch processes, 0 = "
        "in-process). headroom = batches/s x train-step seconds of the stage that reads the pipeline "
        "(goal >= 5).")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/tpad_base.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Data cache directory (default <tempdir>/tpad_bench_<preset>).")
_PIPELINES = flags.DEFINE_list("pipelines", list(PIPELINES), f"Which of {PIPELINES} to measure.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts (data.worker_count).")
_WINDOW = flags.DEFINE_integer("window", 50, "Batches per timed window.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per measurement (the median counts).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed windows before them.")
_STEP_SECONDS = flags.DEFINE_list("step_seconds", [], "stage=seconds of one train step, e.g. stage2=0.43.")
_STEP_JSON = flags.DEFINE_string("step_json", None, "JSON lines with 'stage' and 'step_s' (train_step.py).")
_NO_RECORD = flags.DEFINE_bool("no-record", False, "Print only; do not append rows to RESULTS.md.")


def stage_name(value) -> str:
    """'stage1' / 'stage2' from that text or the stage number; other text is returned as is."""
    text = str(value)
    return f"stage{text}" if text.isdigit() else text


def step_times(pairs, json_path) -> dict:
    """{stage: seconds of one train step} from `stage=seconds` pairs, then a JSON-lines file (it wins).

    JSON lines of other stages (stage-2 variants such as "stage2_no-gen") and other lines are skipped.
    """
    times = {}
    for pair in pairs:
        stage, _, seconds = pair.partition("=")
        if stage_name(stage) not in STAGES:
            raise ValueError(f"--step_seconds {pair!r}: the stage is stage1 or stage2 (or 1 or 2)")
        times[stage_name(stage)] = float(seconds)
    if json_path:
        with open(json_path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line) if line.startswith("{") else {}
                if stage_name(record.get("stage")) in STAGES and "step_s" in record:
                    times[stage_name(record["stage"])] = float(record["step_s"])
    return times


def json_key(column: str) -> str:
    """A column name as a JSON field: "batches/s" -> "batches_per_s", "step s" -> "step_s"."""
    return column.replace("/", "_per_").replace(" ", "_")


def prepare(config, workdir):
    """(PreparedData, tokenizer) with the TFDS item table built, as a training run prepares them."""
    data = prepared.load_or_prepare(config, workdir)
    tokenizer = tokenizer_lib.tokenizer_for(config, data, workdir, pretrained.tokenizer_source(config, workdir))
    tfds_builder.build_item_table(data, workdir)
    return data, tokenizer


def batch_size_of(config, name) -> int:
    """The per-process batch size the stage reading pipeline `name` uses (one process here)."""
    return config.stage2.batch_size if STAGE_OF[name] == "stage2" else config.stage1.batch_size


def training_iterator(config, name, data, tokenizer):
    """The endless shuffled iterator the training stage builds for pipeline `name`."""
    batch_size, order = batch_size_of(config, name), dict(shuffle=True, repeat=True, seed=config.seed)
    if name == "session_batches":
        return pipeline.session_batches(config, data, tokenizer, "train", batch_size, **order)
    if name == "item_row_batches":
        return pipeline.item_row_batches(config, data.num_items, batch_size, **order)
    return pipeline.item_batches(config, data, tokenizer, config.data.item_visual_tokens, batch_size, **order)


def with_workers(config, workers):
    """A copy of `config` with data.worker_count = `workers`."""
    changed = config.copy_and_resolve_references()
    changed.data.worker_count = workers
    return changed


def measure_pipeline(config, name, workers, data, tokenizer) -> dict:
    """Batches/s of pipeline `name` with `workers` Grain workers (median of the timed windows)."""
    iterator = training_iterator(with_workers(config, workers), name, data, tokenizer)
    window = _WINDOW.value
    try:
        median_s, first_s, _ = median_time(lambda: [next(iterator) for _ in range(window)], _WINDOWS.value,
                                           warmup=_WARMUP.value)
    finally:
        iterator.close()  # stops the worker processes before the next measurement starts its own
    batch_size = batch_size_of(config, name)
    return {"pipeline": name, "batch": batch_size, "workers": workers, "batches/s": window / median_s,
            "examples/s": window * batch_size / median_s, "first window s": first_s}


def with_headroom(row, steps) -> dict:
    """`row` plus the step time of its stage and headroom = batches/s x step_s (when known)."""
    step_s = steps.get(STAGE_OF[row["pipeline"]])
    if step_s is None:
        return {**row, "step s": "", "headroom": ""}
    return {**row, "step s": step_s, "headroom": row["batches/s"] * step_s}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # grain logs every worker start at INFO
    config = _CONFIG.value
    unknown = set(_PIPELINES.value) - set(PIPELINES)
    if unknown:
        raise app.UsageError(f"unknown pipelines {sorted(unknown)}; choose from {PIPELINES}")
    steps = step_times(_STEP_SECONDS.value, _STEP_JSON.value)
    workdir = _WORKDIR.value or os.path.join(tempfile.gettempdir(), f"tpad_bench_{config.preset}")
    data, tokenizer = prepare(config, workdir)
    rows = []
    for name in [n for n in PIPELINES if n in _PIPELINES.value]:
        measured = [measure_pipeline(config, name, int(w), data, tokenizer) for w in _WORKERS.value]
        for row in measured:
            row = with_headroom({"preset": config.preset, **row, "machine": machine()}, steps)
            rows.append(row)
            emit(benchmark="loader", **{json_key(key): value for key, value in row.items()})
    short = [r for r in rows if r["headroom"] != "" and r["headroom"] < HEADROOM_GOAL]
    for row in short:
        print(f"below the {HEADROOM_GOAL:g}x goal: {row['pipeline']} with {row['workers']} workers "
              f"({row['headroom']:.2f}x)")
    if not _NO_RECORD.value:
        append_results("Input pipeline", COLUMNS, rows, note=NOTE)


if __name__ == "__main__":  # Grain's worker processes import this module again
    flags.mark_flags_as_required(["config"])
    app.run(main)
