"""The JAX tower step against the same step in PyTorch (HF transformers), alternating on this machine.

    python benchmarks/torch_reference.py --preset anchor [--rounds 4] [--steps 5] [--no-record]
        # run alone: timings need a quiet machine

Both sides build one LLaVA-layout tower from the same `MLLMConfig` (`bench_towers.tower_config`): JAX
with `tpad_jax`, PyTorch with `LlavaForConditionalGeneration` from an equivalent config (random init,
fp32, sdpa attention) on torch's CPU build. Same batch (16 x 128 tokens = 64 image tokens of one 64x64
image each + 64 text tokens), same loss (next-token cross-entropy on the text positions), LoRA of rank
`lora_rank` on q, k, v, o, gate, up, down of every LM layer (plain PyTorch modules on the torch side),
AdamW over the LoRA parameters only. Both sides compute logits only where the loss reads them: the JAX
side by construction, PyTorch through HF's `logits_to_keep` (the text positions and the one before
them); `--torch_logits all` restores HF's default of logits at every position, the unequal comparison
earlier rows of RESULTS.md measured.

`--preset anchor` is the model of shared/notes/perf-anchors.md (LM d=256 x 4 layers), `base` the
project's CPU default. Each side is a subprocess that builds and compiles once, then times `--steps`
calls per command (after one untimed call): the driver alternates the two for `--rounds` rounds (so
both see the same machine load) and reports medians over all timed calls and the ratio torch_s / jax_s,
with the CPU time other processes took meanwhile (`other_cores`; Linux /proc). The JAX worker runs in
this interpreter's venv, the torch worker in `--torch-python` (.venv-parity: torch stays out of
requirements.txt).
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from common import ROOT, emit, record_rows

MEASUREMENTS = ("forward", "step")
SIDES = ("jax", "torch")


# ------------------------------------------------------------------------------------------ torch side


def hf_llava_config(spec):
    """transformers' LlavaConfig with the shapes of an `MLLMConfig` given as a dict (`model_spec`)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    lm, vision = spec["lm"], spec["vision"]
    text = LlamaConfig(
        vocab_size=lm["vocab_size"], hidden_size=lm["hidden_size"], intermediate_size=lm["mlp_size"],
        num_hidden_layers=lm["num_layers"], num_attention_heads=lm["num_heads"],
        num_key_value_heads=lm["num_kv_heads"], head_dim=lm["head_dim"], rms_norm_eps=lm["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": lm["rope_theta"]},
        attention_bias=lm["qkv_bias"], tie_word_embeddings=lm["tie_embeddings"],
        max_position_embeddings=512)
    clip = CLIPVisionConfig(
        image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=vision["hidden_size"],
        intermediate_size=vision["mlp_size"], num_hidden_layers=vision["num_layers"],
        num_attention_heads=vision["num_heads"], layer_norm_eps=vision["layer_norm_eps"],
        hidden_act=vision["activation"])
    return LlavaConfig(
        vision_config=clip, text_config=text, image_token_index=lm["vocab_size"] - 1,
        vision_feature_layer=vision["feature_layer"],
        vision_feature_select_strategy=vision["select_strategy"],
        image_seq_length=spec["num_image"], projector_hidden_act="gelu")


def torch_model(spec):
    """HF LLaVA (random init, fp32, sdpa) with its base frozen and plain-PyTorch LoRA on the LM layers."""
    import torch
    from transformers import LlavaForConditionalGeneration

    class LoRALinear(torch.nn.Module):
        """base(x) + (alpha / rank) * B(A(x)), B zero-initialised (PEFT's layout)."""

        def __init__(self, base, rank, alpha):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
            torch.nn.init.zeros_(self.lora_b.weight)
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(hf_llava_config(spec), attn_implementation="sdpa",
                                                       dtype=torch.float32)
    model.requires_grad_(False)
    targets = tuple(f"{t}_proj" for t in spec["lora_targets"])
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if "language_model" in name and child in targets:
            adapted = LoRALinear(module, spec["lora_rank"], spec["lora_alpha"])
            setattr(model.get_submodule(parent), child, adapted)
    return model


def torch_steps(spec):
    """(forward, step, info) of `torch_model` on the benchmark batch; each call returns the loss."""
    import torch
    import torch.nn.functional as F

    model = torch_model(spec)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(lora, lr=1e-3, weight_decay=1e-4)  # optax.adamw's defaults
    batch, num_image, vocab = spec["batch"], spec["num_image"], spec["lm"]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(2, vocab - 1, (batch, spec["text"]), generator=generator)
    tokens = torch.cat([torch.full((batch, num_image), vocab - 1), text], dim=1)
    size = spec["vision"]["image_size"]
    pixels = torch.rand((batch, 3, size, size), generator=generator) * 2 - 1

    # Logits at the last text + 1 positions: those that predict the text (the last one predicts nothing).
    keep = spec["text"] + 1 if spec.get("torch_logits", "text") == "text" else 0  # 0: every position

    def loss():
        logits = model(input_ids=tokens, pixel_values=pixels, attention_mask=torch.ones_like(tokens),
                       logits_to_keep=keep).logits
        labels = tokens[:, num_image:].reshape(-1)
        predicting = logits[:, :-1] if keep else logits[:, num_image - 1:-1]
        return F.cross_entropy(predicting.reshape(-1, vocab), labels)

    def forward():
        with torch.no_grad():
            return loss().item()

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return value.item()

    lora_params = sum(p.numel() for p in lora)
    info = {"lora_params": lora_params, "params": sum(p.numel() for p in model.parameters()) - lora_params,
            "threads": torch.get_num_threads(), "version": torch.__version__}
    return forward, step, info


# ------------------------------------------------------------------------------------------ jax side


def jax_steps(preset, batch, text):
    """(forward, step, info) of bench_towers' compiled tower step; each call returns the loss."""
    import jax

    import bench_towers

    cfg = bench_towers.tower_config(preset)
    steps = bench_towers.compile_steps(cfg, bench_towers.make_batch(cfg, batch, text))
    info = {"lora_params": steps.lora_params, "params": steps.params, "compile_s": steps.compile_s,
            "flops": steps.flops, "version": jax.__version__}
    return (lambda: float(steps.forward())), (lambda: float(steps.step())), info


def serve(forward, step, info, warmup=2):
    """Warms up, says it is ready, then answers `forward N` / `step N` from stdin until EOF.

    Each command makes one untimed call first: after the other side's turn, the first call pays for
    waking threads and faulting memory back in, which a training loop running steps back to back never
    pays.
    """
    for _ in range(warmup):
        forward(), step()
    print(json.dumps({"ready": True, **info}), flush=True)
    calls = {"forward": forward, "step": step}
    for line in sys.stdin:
        name, count = line.split()
        calls[name]()
        times = []
        for _ in range(int(count)):
            start = time.perf_counter()
            calls[name]()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)


# ------------------------------------------------------------------------------------------ driver


def model_spec(cfg, batch, text, torch_logits="text"):
    """What the torch worker needs of an MLLMConfig, as JSON-able dict (the torch venv has no tpad_jax)."""
    return {"lm": dataclasses.asdict(cfg.lm), "vision": dataclasses.asdict(cfg.vision),
            "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": list(cfg.lora_targets),
            "num_image": cfg.vision.num_features, "batch": batch, "text": text, "torch_logits": torch_logits}


class Worker:
    """One side's subprocess: started, waited for until ready, then asked to time calls."""

    def __init__(self, python, args):
        self.process = subprocess.Popen([python, os.path.abspath(__file__), *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.info = self._reply()

    def time(self, name, count):
        self.process.stdin.write(f"{name} {count}\n")
        self.process.stdin.flush()
        return self._reply()["times"]

    def close(self):
        self.process.stdin.close()
        self.process.wait()

    def _reply(self):
        # The workers print only JSON lines on stdout; anything else (warnings) goes to stderr.
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args} exited with {self.process.wait()}")
        return json.loads(line)


def cpu_seconds(pids=None):
    """CPU seconds used so far by the whole machine (pids=None) or by the processes `pids` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    if pids is None:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / tick
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def alternate(workers, rounds, steps, measure_peak, pause_s=1.0):
    """({side: {measurement: [seconds]}}, [peak GFLOP/s], other_cores).

    Each round times every measurement on each side in turn, then the machine's matmul peak under the
    same conditions; the side that goes first alternates between rounds, and `pause_s` lets the other
    side's threads settle. other_cores is the CPU time of every other process on the machine per wall
    second meanwhile: near 0 on a quiet machine; more slows the torch side (its threads spin at
    barriers) more than the JAX side, so a busy run overstates the ratio.
    """
    ours = [os.getpid()] + [worker.process.pid for worker in workers.values()]
    machine_before, ours_before, start = cpu_seconds(), cpu_seconds(ours), time.perf_counter()
    times = {side: {name: [] for name in MEASUREMENTS} for side in workers}
    peaks = []
    for round_index in range(rounds):
        order = SIDES if round_index % 2 == 0 else SIDES[::-1]
        for side in order:
            for name in MEASUREMENTS:
                times[side][name] += workers[side].time(name, steps)
            time.sleep(pause_s)
        peaks.append(measure_peak())
    others = (cpu_seconds() - machine_before) - (cpu_seconds(ours) - ours_before)
    return times, peaks, max(others, 0.0) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="anchor", choices=("anchor", "base"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement, side and round")
    parser.add_argument("--torch-python", default=str(ROOT / ".venv-parity" / "bin" / "python"))
    parser.add_argument("--torch_logits", default="text", choices=("text", "all"),
                        help="PyTorch's logits: where the loss reads them (like JAX) or at every position")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "torch":
        return serve(*torch_steps(json.loads(args.spec)))
    if args.worker == "jax":
        return serve(*jax_steps(args.preset, args.batch, args.text))

    import bench_towers
    from peak import measure_peak

    cfg = bench_towers.tower_config(args.preset)
    spec = json.dumps(model_spec(cfg, args.batch, args.text, args.torch_logits))
    shape = ["--preset", args.preset, "--batch", str(args.batch), "--text", str(args.text)]
    workers = {"jax": Worker(sys.executable, shape + ["--worker", "jax"])}
    workers["torch"] = Worker(args.torch_python, shape + ["--worker", "torch", "--spec", spec])
    times, peaks, other_cores = alternate(workers, args.rounds, args.steps, measure_peak)
    for worker in workers.values():
        worker.close()
    report(args, cfg, workers, times, statistics.median(peaks), other_cores)


def report(args, cfg, workers, times, peak_gflops, other_cores):
    """Prints a JSON line per measurement and records them unless --no-record."""
    tokens = args.batch * (cfg.vision.num_features + args.text)
    jax_info, torch_info = workers["jax"].info, workers["torch"].info
    if jax_info["lora_params"] != torch_info["lora_params"]:
        raise RuntimeError(f"LoRA parameters differ: jax {jax_info['lora_params']}, "
                           f"torch {torch_info['lora_params']}")
    rows = []
    for name in MEASUREMENTS:
        jax_s, torch_s = (statistics.median(times[side][name]) for side in SIDES)
        gflop = jax_info["flops"][name] / 1e9
        rows.append(emit(
            bench="torch_reference", preset=args.preset, measurement=name, torch_logits=args.torch_logits,
            jax_s=round(jax_s, 4), torch_s=round(torch_s, 4), ratio=round(torch_s / jax_s, 2),
            jax_tokens_per_s=round(tokens / jax_s), torch_tokens_per_s=round(tokens / torch_s),
            jax_gflop=round(gflop, 2), mfu=round(gflop / jax_s / peak_gflops, 3),
            peak_gflops=round(peak_gflops, 1), calls=len(times["jax"][name]),
            other_cores=round(other_cores, 2), params=jax_info["params"],
            torch_params=torch_info["params"], lora_params=jax_info["lora_params"], jax=jax_info["version"],
            torch=torch_info["version"]))
    if not args.no_record:
        # Rows of HF's every-position logits go on in their old table; like-for-like ones have their own.
        section = "Tower step vs PyTorch" if args.torch_logits == "all" else \
            "Tower step vs PyTorch, logits only where the loss reads them"
        record_rows(
            section,
            ["preset", "measurement", "jax_s", "torch_s", "ratio", "jax_tokens_per_s", "torch_tokens_per_s",
             "jax_gflop", "mfu", "peak_gflops", "calls", "other_cores", "params", "lora_params", "jax",
             "torch", "machine"],
            rows, note=NOTE)


NOTE = ("`python benchmarks/torch_reference.py --preset {anchor,base}` (run alone: timings need a quiet "
        "machine): one LLaVA-layout tower, batch 16 x 128 tokens (64 image + 64 text), next-token CE on "
        "the text, LoRA rank 8 on q,k,v,o,gate,up,down of every LM layer, AdamW over LoRA only, fp32, "
        "this machine's CPU. JAX (tpad_jax, `bench_towers.compile_steps`) and PyTorch (HF "
        "`LlavaForConditionalGeneration`, sdpa, plain-PyTorch LoRA; torch_logits `text`: logits only at "
        "the positions the loss reads, via `logits_to_keep`, as JAX computes them; `all`: at every "
        "position, HF's default) run as two subprocesses timed in alternating rounds; times are medians over all "
        "timed calls; ratio = torch_s / jax_s. `step` = forward + backward + AdamW, `forward` = the loss "
        "alone. jax_gflop is XLA's cost_analysis of the JAX program (the base is frozen: no weight "
        "gradients), mfu = jax_gflop / jax_s / peak_gflops (`peak.measure_peak()`, best fp32 matmul, "
        "measured after each round: median). other_cores = CPU time of other processes per second during "
        "the run (0: quiet; other work slows torch more than JAX). Each timed batch follows one untimed "
        "call. `anchor` is the model of shared/notes/perf-anchors.md (LM d=256 x 4, CLIP d=128 x 2, 7.63 "
        "M parameters), `base` the project's CPU default (LM d=128 x 2).")


if __name__ == "__main__":
    main()
