"""Compile time, step time, tokens/s, examples/s and model FLOP utilisation of the TPAD train steps.

    python benchmarks/train_step.py --config configs/tpad_base.py --preset base [--stages 1,2] \
        [--steps 10] [--set KEY=VALUE ...] [--label TEXT] [--no-record]
        # run alone: timings need a quiet machine

Each stage's step is built as a run builds it: the synthetic data is prepared into `--workdir` (default
<tempdir>/tpad_bench_<preset>; later calls reuse it), then `inputs.build_inputs`, the stage's loss,
optimizer and trainable filter from `stages.stage1_spec` / `stages.stage2_spec` (the `tpad` variant,
keep term included), the jitted and donating step of `loop.build_step`, and a fresh initialized state
from `loop.fresh_state` (stage 2 starts from the initialized model rather than a trained stage 1: the
same shapes, the same step). Batches are the stage's own pipeline's, put on device before timing.

Measured per stage:
  compile_s     lowering + XLA compilation of the step (ahead of time, the executable that is timed)
  step_s        median of `--steps` steps after `--warmup` untimed ones
  tokens/s      every position both towers process per step (padding included: it is computed), / step_s
                stage 2: Transfer over the session prompts, K over the shown items + target and the keep
                term's items; stage 1: K over the item prompts
  examples/s    sessions (stage 2) or items (stage 1) per second
  model GFLOP   6 x parameters x tokens per tower: the LM's non-embedding parameters (layers, final norm,
                lm_head) and the tower's LoRA set over its tokens, plus the projector over the visual
                tokens it projects. The frozen ViT does not run in a step (its features are a per-item
                table) and the heads (< 1 % here) and attention scores are not counted.
  XLA GFLOP     `compiled.cost_analysis()["flops"]` of the step, for comparison
  MFU           model GFLOP / step_s / peak; XLA util = XLA GFLOP / step_s / peak, with peak from
                benchmarks/peak.py's `measure_peak()` (best fp32 matmul GFLOP/s on this machine)
  compiles      compilations of the step while it was compiled and timed (1: no recompilation)
  loop step s   seconds per step inside `loop.run_loop` (`--loop_steps` steps after as many untimed
                ones, from metrics.jsonl's examples_per_s; no eval, one checkpoint at the end): the
                step plus what the loop adds (input pipeline, metric fetches, logging)
"""

import argparse
import dataclasses
import importlib.util
import tempfile
import time

import jax
import ml_collections
from flax import nnx

from common import apply_overrides, default_workdir, emit_row, median_time, record_rows
from peak import measure_peak
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.train import inputs as inputs_lib, loop, stages
from tpad_jax.train.metrics_log import read_metrics

COLUMNS = ["preset", "stage", "batch", "tokens/step", "compile s", "step s", "tokens/s", "examples/s",
           "model GFLOP", "XLA GFLOP", "MFU %", "XLA util %", "peak GFLOP/s", "compiles", "loop step s",
           "machine"]
NOTE = ("`python benchmarks/train_step.py --config configs/tpad_base.py --preset <preset>` (run alone: "
        "timings need a quiet machine): the stages' own jitted, donating train steps on their own "
        "pipelines' batches; median step of 10 after 2 warm-up steps. tokens = every position both towers "
        "process (padding included); examples = sessions (stage 2) or items (stage 1). model GFLOP = 6 x "
        "non-embedding LM + LoRA parameters x tokens per tower + 6 x projector parameters x visual tokens "
        "(the frozen ViT is a per-item table, not run in a step); XLA GFLOP = `cost_analysis()`; MFU = "
        "model GFLOP / step s / peak (`benchmarks/peak.py`). compiles = compilations of the step while it "
        "was compiled and timed. loop step s = seconds per step inside `loop.run_loop` (20 steps after "
        "20), input pipeline and metric fetches included. Stage 2 starts from the initialized model, not "
        "a trained stage 1 (same shapes and step).")


@dataclasses.dataclass
class Workload:
    """What one step of a stage processes: positions per tower and visual tokens per projector."""

    examples: int
    lm_tokens: dict  # tower -> positions its LM processes per step
    visual_tokens: dict  # tower -> visual tokens its projector projects per step


def load_config(path: str, preset: str):
    """`get_config(preset)` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def stage1_workload(inputs, batch) -> Workload:
    """K over the batch's item prompts."""
    items, cfg = batch["rows"].shape[0], inputs.tpad_cfg
    return Workload(items, {tpad_lib.KNOWLEDGE: items * cfg.item_prompt_length},
                    {tpad_lib.KNOWLEDGE: items * cfg.item_visual_tokens})


def stage2_workload(inputs, batch) -> Workload:
    """Transfer over the session prompts; K over the shown items, the targets and the keep term's items."""
    config, cfg = inputs.config, inputs.tpad_cfg
    sessions, shown = batch["rows"].shape
    items = sessions * (shown + 1) + (config.stage2.keep_batch_size if config.stage2.keep_weight else 0)
    m = config.data.visual_tokens_per_item if cfg.item_visual_tokens else 0
    lm_tokens = {tpad_lib.TRANSFER: batch["tokens"].size, tpad_lib.KNOWLEDGE: items * cfg.item_prompt_length}
    visual = {tpad_lib.TRANSFER: sessions * shown * m, tpad_lib.KNOWLEDGE: items * cfg.item_visual_tokens}
    return Workload(sessions, lm_tokens, visual)


def _size(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def model_flops(model: tpad_lib.TPAD, work: Workload) -> float:
    """6 x parameters x tokens over both towers (see the module docstring for what counts)."""
    towers = model.towers
    flops = 0.0
    for tower, tokens in work.lm_tokens.items():
        lm = towers.base(tower).lm
        per_token = _size(lm) - _size(lm.embed) + _size(towers.towers[tower].lora)
        flops += 6 * per_token * tokens
    for tower, tokens in work.visual_tokens.items():
        projector = towers.towers[tower].projector
        flops += 6 * (_size(projector) if projector is not None else 0) * tokens
    return flops


def xla_flops(compiled) -> float:
    """Flops of a compiled executable by XLA's cost model (a dict, or one per program in older jax)."""
    cost = compiled.cost_analysis()
    costs = cost if isinstance(cost, (list, tuple)) else [cost]
    return float(sum(c.get("flops", 0.0) for c in costs))


def measure_stage(inputs, spec: stages.StageSpec, workload_of, steps: int, warmup: int) -> dict:
    """Compiles and times one stage's train step; returns the measurement row."""
    args = dict(mesh=inputs.mesh, rules=inputs.rules, make_model=inputs.make_model, tx=spec.tx, wrt=spec.wrt)
    graphdef, abstract, train_step = loop.build_step(loss_fn=spec.loss_fn, **args)
    state, rng = loop.fresh_state(abstract=abstract, init_fn=spec.init_fn, seed=spec.seed, **args)
    batches = [mesh_lib.global_batch(next(spec.batches), inputs.mesh) for _ in range(4)]
    work = workload_of(inputs, batches[0])
    flops = model_flops(nnx.merge(graphdef, state).model, work)

    with loop.CompileCounter() as compiles:
        with mesh_lib.activate(inputs.mesh, inputs.rules):
            compiled, compile_s = _timed(lambda: train_step.lower(state, batches[0], rng).compile())
        carry = {"state": state, "index": 0}

        def one_step():
            batch = batches[carry["index"] % len(batches)]
            carry["state"], metrics = compiled(carry["state"], batch, rng)
            carry["index"] += 1
            return metrics

        step_s, _, _ = median_time(one_step, steps, warmup=warmup, sync=jax.block_until_ready)
    tokens = sum(work.lm_tokens.values())
    return {"stage": spec.dir_name, "batch": work.examples, "tokens/step": tokens,
            "compile s": compile_s, "step s": step_s, "tokens/s": tokens / step_s,
            "examples/s": work.examples / step_s, "model GFLOP": flops / 1e9,
            "XLA GFLOP": xla_flops(compiled) / 1e9, "compiles": compiles.of(train_step)}


def loop_step_seconds(inputs, spec: stages.StageSpec, examples: int, window: int) -> float:
    """Seconds per step of `run_loop` over `window` steps (`examples` each), after `window` steps that
    include compiling."""
    train_config = ml_collections.ConfigDict(dict(
        inputs.config.train.to_dict(), log_every=window, eval_every=10**9, checkpoint_every=10**9))
    with tempfile.TemporaryDirectory() as workdir:
        loop.run_loop(workdir=workdir, train_config=train_config, mesh=inputs.mesh, rules=inputs.rules,
                      make_model=inputs.make_model, tx=spec.tx, wrt=spec.wrt, loss_fn=spec.loss_fn,
                      data_iterator=spec.batches, num_steps=2 * window, seed=spec.seed, init_fn=spec.init_fn,
                      desc=f"{spec.desc} in the loop")
        return examples / read_metrics(workdir)[-1]["examples_per_s"]


def _timed(fn):
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tpad_base.py", help="file with get_config(preset)")
    parser.add_argument("--preset", default="base", help="the config's argument: base or tiny")
    parser.add_argument("--workdir", default=None, help="data cache (default <tempdir>/tpad_bench_<preset>)")
    parser.add_argument("--stages", default="1,2", help="comma-separated stages to measure")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--loop_steps", type=int, default=20, help="timed steps in run_loop (0: skip)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override, e.g. --set model.dtype=float32 (repeatable)")
    parser.add_argument("--label", default=None, help="the preset column (default --preset)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    config = apply_overrides(load_config(args.config, args.preset), args.set)
    inputs = inputs_lib.build_inputs(config, args.workdir or default_workdir(args.preset))
    peak = measure_peak()
    specs = {"1": (lambda: stages.stage1_spec(inputs), stage1_workload),
             "2": (lambda: stages.stage2_spec(inputs, None), stage2_workload)}
    rows = []
    for stage in args.stages.split(","):
        make_spec, workload_of = specs[stage]
        spec = make_spec()
        row = measure_stage(inputs, spec, workload_of, args.steps, args.warmup)
        if args.loop_steps:
            row["loop step s"] = loop_step_seconds(inputs, spec, row["batch"], args.loop_steps)
        row.update({"preset": args.label or args.preset,
                    "MFU %": 100 * row["model GFLOP"] / row["step s"] / peak,
                    "XLA util %": 100 * row["XLA GFLOP"] / row["step s"] / peak, "peak GFLOP/s": peak})
        rows.append(emit_row("train_step", row))
    if not args.no_record:
        record_rows("TPAD train step", COLUMNS, rows, note=NOTE)


if __name__ == "__main__":
    main()
