"""The accelerator check: one stage-2 train step of a LLaVA-shaped 1.4 B model and the export of a
100,000-item catalogue, on whatever devices JAX sees, in one short run.

    bash benchmarks/accelerator_check.sh               # a GPU or TPU host (installs the accelerator jax)
    python benchmarks/accelerator_check.py --dry_run   # CPU: the tiny preset through the same code
    bash benchmarks/accelerator_check.sh --export_items 0 --set model.preset=llava_1_5_7b \
        --set stage2.batch_size=64 --set stage2.keep_batch_size=32   # the 7B step alone

Measured on one H200 (2026-12-04): benchmarks/RESULTS.md, "Accelerator check".

The step is a run's own (`stages.stage2_spec` of the `tpad` variant, keep term included, built and timed by
`benchmarks/train_step.py`'s `measure_stage`) on a synthetic catalogue, with random weights:
`model.preset=llava_tinyllama_1b` (CLIP ViT-L/14-336 + a TinyLlama-1.1B-shaped LM) over the 7B
config's data layout (`configs/tpad_llava7b.py`: 336 px images, 64 pooled visual tokens per item
prompt), bfloat16 compute, the frozen base stored in bfloat16, remat and scanned layers, the mesh
(1, devices, 1): FSDP over every device. The export embeds `--export_items` items (the catalogue's item
tables tiled to that many rows) with `export.item_embeddings`, the production call, data-parallel over
the mesh.

Printed (Markdown): devices; compile s, step s, tokens/s, model TFLOP/s; MFU against the device's
dense bf16 peak from its spec sheet (when the kind is known) and against the bf16 matmul peak measured
here; peak device memory (`memory_stats`, where the backend keeps it); export items/s.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import peak as peak_lib
import train_step
from common import apply_overrides
from tpad_jax import export
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import inputs as inputs_lib
from tpad_jax.train import loop
from tpad_jax.train import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 peak TFLOP/s per device from the vendors' spec sheets, by a substring of `device_kind`.
SPEC_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0))
# What a pod run of the 7B config changes for the check: a 1.4 B model, random weights, synthetic data.
ACCELERATOR = {"model.preset": "llava_tinyllama_1b", "model.checkpoint_dir": None,
               "data.source": "synthetic", "data.synthetic.num_items": 2000,
               "data.synthetic.num_sessions": 4000, "stage2.batch_size": 32, "stage2.keep_batch_size": 16}
# Both runs: the 7B config's numerics and memory policy (the dry run applies them to the tiny preset).
POLICY = {"model.dtype": "bfloat16", "model.base_param_dtype": "bfloat16", "model.full_finetune": False,
          "model.remat": True, "model.scan_layers": True}


def check_config(dry_run: bool, devices: int):
    """configs/tpad_llava7b.py with ACCELERATOR (the dry run: tpad_base.py:tiny), POLICY, and FSDP over
    every device."""
    if dry_run:
        config, overrides = train_step.load_config(os.path.join(ROOT, "configs", "tpad_base.py"), "tiny"), {}
    else:
        config = train_step.load_config(os.path.join(ROOT, "configs", "tpad_llava7b.py"), "fsdp8")
        overrides = ACCELERATOR
    with config.unlocked():
        for key, value in {**overrides, **POLICY}.items():
            *path, name = key.split(".")
            target = config
            for part in path:
                target = target[part]
            target[name] = value
        config.mesh.shape = (1, devices, 1)
    return config


def spec_peak(kind: str) -> float | None:
    return next((tflops * 1e12 for name, tflops in SPEC_PEAK_TFLOPS if name in kind), None)


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def tiled_tables(model: tpad_lib.TPAD, num_items: int):
    """The model's item tables tiled to `num_items` rows (the export's cost depends on rows, not content)."""
    state = nnx.state(model, tpad_lib.ItemTable)
    for _, variable in nnx.to_flat_state(state):
        value = np.asarray(variable.get_value())
        variable.set_value(jnp.asarray(np.resize(value, (num_items, *value.shape[1:]))))
    return state


def time_export(inputs, num_items: int, batch: int) -> str:
    """Embeds `num_items` items (the tables tiled) with the production export; its table cell."""
    model = inputs.make_model()
    inputs.initialize(model)
    nnx.update(model, tiled_tables(model, num_items))
    # On the run's mesh as a trained stage's state is: weights replicated, item tables split by rows
    # (when the devices divide them), and the export splits every chunk of items over the devices.
    graphdef, tables, rest = nnx.split(model, tpad_lib.ItemTable, ...)
    devices = inputs.mesh.size
    rows = PartitionSpec(mesh_lib.batch_axes(inputs.mesh)) if num_items % devices == 0 else PartitionSpec()
    tables = jax.device_put(tables, NamedSharding(inputs.mesh, rows))
    model = nnx.merge(graphdef, tables, jax.device_put(rest, NamedSharding(inputs.mesh, PartitionSpec())))
    # One call, its compile seconds taken out: a second, warm call would embed every item again,
    # which on a lent machine costs minutes of its short lease.
    with loop.CompileCounter() as compiles:
        clock = time.perf_counter()
        embeddings = export.item_embeddings(model, batch, num_items)
        call_s = time.perf_counter() - clock
    assert embeddings.shape[0] == num_items and np.isfinite(embeddings).all()
    run_s = call_s - compiles.seconds
    return f"{run_s:.1f} s ({num_items / run_s:,.0f} items/s), after {compiles.seconds:.1f} s compiling"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="CPU: the tiny preset, same code path")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 untimed ones")
    parser.add_argument("--export_items", type=int, default=100_000)
    parser.add_argument("--export_batch", type=int, default=256, help="items per export chunk")
    parser.add_argument("--workdir", default=None, help="synthetic data (default: a temporary directory)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override after the check's own, e.g. --set model.preset=llava_1_5_7b "
                             "(repeatable)")
    args = parser.parse_args()

    devices = jax.devices()
    kind = devices[0].device_kind
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} x {kind}", flush=True)
    if jax.default_backend() == "cpu" and not args.dry_run:
        sys.exit("accelerator_check: JAX sees no accelerator; install its jax build "
                 "(benchmarks/accelerator_check.sh does) or pass --dry_run")
    config = apply_overrides(check_config(args.dry_run, len(devices)), args.set)
    with tempfile.TemporaryDirectory() as scratch:
        clock = time.perf_counter()
        inputs = inputs_lib.build_inputs(config, args.workdir or scratch)
        print(f"data and item tables: {time.perf_counter() - clock:.1f} s ({inputs.data.num_items} items, "
              f"{inputs.tpad_cfg.item_prompt_length}-token item prompts)", flush=True)
        spec = stages.stage2_spec(inputs, None)
        row = train_step.measure_stage(inputs, spec, train_step.stage2_workload, args.steps, warmup=2)
        step_memory = peak_memory_gib()

        export_cell = time_export(inputs, args.export_items, args.export_batch) if args.export_items else None

    measured_peak = (peak_lib.measure_peak() * 1e9 if args.dry_run else
                     max(peak_lib.matmul_gflops(n, jnp.bfloat16, 5)[1] for n in (4096, 8192)) * 1e9)
    flops_per_s = row["model GFLOP"] * 1e9 / row["step s"]
    spec_tflops = spec_peak(kind)
    abstract = nnx.eval_shape(inputs.make_model)
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    cells = {
        "devices": f"{len(devices)} x {kind}", "preset": config.model.preset,
        "parameters": f"{parameters / 1e6:,.1f} M", "batch (sessions)": row["batch"],
        "compile s": f"{row['compile s']:.1f}", "step s": f"{row['step s']:.4f}",
        "tokens/s": f"{row['tokens/s']:,.0f}", "model TFLOP/s": f"{flops_per_s / 1e12:.2f}",
        "MFU (spec bf16 peak)": f"{100 * flops_per_s / spec_tflops:.1f} %" if spec_tflops else "unknown kind",
        "MFU (measured matmul peak)": f"{100 * flops_per_s / measured_peak:.1f} %",
        "peak device memory GiB": "n/a (backend keeps none)" if step_memory is None else f"{step_memory:.2f}",
        f"export {args.export_items:,} items": export_cell or "not run (--export_items 0)",
        "compiles of the step": row["compiles"],
    }
    print("\n| measure | value |\n|---|---|")
    for name, value in cells.items():
        print(f"| {name} | {value} |")
    print(f"\nmeasured matmul peak: {measured_peak / 1e12:.2f} TFLOP/s "
          f"({'fp32, dry run' if args.dry_run else 'bf16'}); the export splits every chunk of items over "
          f"{len(devices)} device(s), each holding 1/{len(devices)} of the item tables' rows")


if __name__ == "__main__":
    main()
