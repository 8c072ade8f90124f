"""Forward and LoRA train-step time of one TPAD tower on this machine.

Shapes follow ../shared/notes/perf-anchors.md: batch 16 x 128 tokens = 64 image tokens (one 64x64 image
each, CLS dropped) + 64 text tokens; loss = next-token cross-entropy on the text positions; AdamW over
the tower's LoRA parameters only (projector and base frozen). `--preset anchor` is the PyTorch anchor's
model (LM d=256 x 4 layers), `base` the project's CPU default (LM d=128 x 2 layers).

    python benchmarks/bench_towers.py [--preset base|anchor|tiny] [--steps 10] [--scan] [--remat]

The step is the training loop's kind of step: a pure function of (state, batch) jitted once, the state
donated. `benchmarks/torch_reference.py` times the same step against HF transformers.
"""

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from common import emit, median_time

from tpad_jax.models.llm import LMConfig
from tpad_jax.models.mllm import MLLMConfig, TPADTowers
from tpad_jax.models.vision import VisionConfig

IMAGE_TOKEN = 1
VOCAB = 8192
IMAGE_SIZE = 64


def anchor_config(vocab_size, image_size):
    """The PyTorch anchor's model: CLIP d=128 x 2 (patch 8); LM d=256 x 4 layers, 4/2 heads, FFN 688."""
    lm = LMConfig(vocab_size=vocab_size, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                  mlp_size=688)
    return MLLMConfig(vision=VisionConfig.base(image_size), lm=lm)


PRESETS = {"tiny": MLLMConfig.tiny, "base": MLLMConfig.base, "anchor": anchor_config}


def tower_config(preset, *, scan=False, remat=False):
    """`preset`'s MLLMConfig at vocab 8192 and 64x64 images, LM layers scanned / rematerialised as asked."""
    cfg = PRESETS[preset](VOCAB, IMAGE_SIZE)
    return dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, scan_layers=scan, remat=remat))


def make_batch(cfg, batch, text_len, seed=0):
    """Tokens [image*P, text*text_len] (text ids avoid the image token), full mask, random pixels."""
    rng = np.random.default_rng(seed)
    num_image = cfg.vision.num_features
    text = rng.integers(2, cfg.lm.vocab_size, size=(batch, text_len))
    tokens = np.concatenate([np.full((batch, num_image), IMAGE_TOKEN), text], axis=1)
    pixels = rng.uniform(-1, 1, size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
    return {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.ones(tokens.shape, bool),
            "pixels": jnp.asarray(pixels, jnp.float32)}


def text_loss(towers, batch, num_image):
    """Mean next-token CE over the text positions; the last layer and the logits run only where the
    loss reads them (the positions before each text token)."""
    feats = towers.encode_images("knowledge", batch["pixels"])
    hidden = towers("knowledge", batch["tokens"], feats, batch["mask"], rows=slice(num_image - 1, -1))
    logits = towers.logits(hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, num_image:]).mean()


@dataclasses.dataclass
class TowerSteps:
    """Compiled forward and train step of one tower, holding the (donated) state between calls."""

    forward: callable       # () -> loss
    step: callable          # () -> loss, updates the held state
    compile_s: dict         # seconds to compile each
    flops: dict             # XLA's cost_analysis FLOPs of each
    params: int             # frozen base + projector parameters of the tower
    lora_params: int


def compile_steps(cfg, batch):
    """Builds the towers and AdamW over the knowledge tower's LoRA set; compiles forward and step AOT."""
    towers = TPADTowers(cfg, image_token_id=IMAGE_TOKEN, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(towers, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    graphdef, state = nnx.split((towers, optimizer))
    num_image = cfg.vision.num_features

    def forward(state, batch):
        towers, _ = nnx.merge(graphdef, state)
        return text_loss(towers, batch, num_image)

    def train_step(state, batch):
        towers, optimizer = nnx.merge(graphdef, state)
        loss_of = functools.partial(text_loss, batch=batch, num_image=num_image)
        loss, grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam))(towers)
        optimizer.update(towers, grads)
        return nnx.state((towers, optimizer)), loss

    compiled, compile_s, flops = {}, {}, {}
    for name, fn, donate in (("forward", forward, ()), ("step", train_step, (0,))):
        start = time.perf_counter()
        compiled[name] = jax.jit(fn, donate_argnums=donate).lower(state, batch).compile()
        compile_s[name] = time.perf_counter() - start
        flops[name] = compiled[name].cost_analysis()["flops"]

    held = {"state": state}

    def run_step():
        held["state"], loss = compiled["step"](held["state"], batch)
        return loss

    frozen = nnx.state((towers.base(), towers.towers["knowledge"].projector))
    lora = nnx.state(towers.towers["knowledge"], nnx.LoRAParam)
    return TowerSteps(forward=lambda: compiled["forward"](held["state"], batch), step=run_step,
                      compile_s=compile_s, flops=flops, params=_count(frozen), lora_params=_count(lora))


def _count(state):
    return sum(x.size for x in jax.tree.leaves(state))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args()

    cfg = tower_config(args.preset, scan=args.scan, remat=args.remat)
    batch = make_batch(cfg, args.batch, args.text)
    steps = compile_steps(cfg, batch)
    tokens = batch["tokens"].size
    print(f"preset={args.preset} params={steps.params / 1e6:.2f}M lora={steps.lora_params:,} "
          f"batch={args.batch}x{batch['tokens'].shape[1]} ({cfg.vision.num_features} image tokens) "
          f"scan={args.scan} remat={args.remat} devices={jax.device_count()}")
    for name in ("forward", "step"):
        median, _, _ = median_time(getattr(steps, name), args.steps, sync=jax.block_until_ready)
        emit(bench="towers", preset=args.preset, measurement=name, compile_s=round(steps.compile_s[name], 2),
             median_s=round(median, 4), tokens_per_s=round(tokens / median),
             gflop=round(steps.flops[name] / 1e9, 3), scan=args.scan, remat=args.remat)


if __name__ == "__main__":
    main()
