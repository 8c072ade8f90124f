"""Items/s of the TPAD embedding export: `export.item_embeddings` and the whole export write.

    python benchmarks/export.py --config configs/tpad_base.py --preset base [--runs 5] \
        [--no-record]   # run alone: timings need a quiet machine

The model is built and initialized as a run builds it (`inputs.build_inputs`, `make_model`,
`initialize`: base weights and the per-item tables; the synthetic data is prepared into `--workdir`,
default <tempdir>/tpad_bench_<preset>). Measured, each the median of `--runs` calls after one warm-up
call (which compiles):

  embeddings  `export.item_embeddings(model, config.eval.batch_size)`: e_K of every item, to host
  write       the same plus `export.write_export` into a temporary directory (what a run does per
              exported variant, without the retrieval probe)
"""

import argparse
import tempfile

from common import default_workdir, emit_row, median_time, record_rows
from train_step import load_config
from tpad_jax import export
from tpad_jax.train import inputs as inputs_lib

COLUMNS = ["preset", "measurement", "items", "batch", "first s", "median s", "items/s", "machine"]
NOTE = ("`python benchmarks/export.py --config configs/tpad_base.py --preset <preset>` (run alone: "
        "timings need a quiet machine): e_K of every item of the initialized model's tables "
        "(`export.item_embeddings`, batch = `eval.batch_size`), and the same plus `export.write_export` "
        "(npy + ids + meta); median of 5 calls after a warm-up call; first s = the warm-up call "
        "(compilation included).")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tpad_base.py", help="file with get_config(preset)")
    parser.add_argument("--preset", default="base", help="the config's argument: base or tiny")
    parser.add_argument("--workdir", default=None, help="data cache (default <tempdir>/tpad_bench_<preset>)")
    parser.add_argument("--runs", type=int, default=5, help="timed calls after one warm-up call")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    config = load_config(args.config, args.preset)
    inputs = inputs_lib.build_inputs(config, args.workdir or default_workdir(args.preset))
    model = inputs.make_model()  # as runner.train_towers builds the "raw" export's model
    inputs.initialize(model)
    batch_size = config.eval.batch_size

    def embeddings():
        return export.item_embeddings(model, batch_size)

    def write():
        with tempfile.TemporaryDirectory() as out_dir:
            export.write_export(out_dir, embeddings(), inputs.data.item_ids, {"variant": "benchmark"})

    rows = []
    for name, fn in (("embeddings", embeddings), ("write", write)):
        median_s, first_s, _ = median_time(fn, args.runs, warmup=1)
        row = {"preset": args.preset, "measurement": name, "items": inputs.data.num_items,
               "batch": batch_size, "first s": first_s, "median s": median_s,
               "items/s": inputs.data.num_items / median_s}
        rows.append(emit_row("export", row))
    if not args.no_record:
        record_rows("TPAD embedding export", COLUMNS, rows, note=NOTE)


if __name__ == "__main__":
    main()
