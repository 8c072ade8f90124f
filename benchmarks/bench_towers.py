"""Forward and LoRA train-step time of one TPAD tower (the `base` preset by default) on this machine.

Shapes follow ../shared/notes/perf-anchors.md: batch 16 x 128 tokens = 64 image tokens (one 64x64 image
each, CLS dropped) + 64 text tokens; loss = next-token cross-entropy on the text positions; AdamW over
the tower's LoRA parameters only (projector and base frozen).

    python benchmarks/bench_towers.py [--preset base] [--steps 10] [--scan] [--remat]
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpad_jax.models.mllm import MLLMConfig, TPADTowers  # noqa: E402

IMAGE_TOKEN = 1


def make_batch(cfg, batch, text_len, seed=0):
    """Tokens [image*P, text*text_len], full mask, random pixels."""
    rng = np.random.default_rng(seed)
    num_image = cfg.vision.num_features
    text = rng.integers(2, cfg.lm.vocab_size, size=(batch, text_len))
    tokens = np.concatenate([np.full((batch, num_image), IMAGE_TOKEN), text], axis=1)
    pixels = rng.uniform(-1, 1, size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3))
    return jnp.asarray(tokens, jnp.int32), jnp.ones(tokens.shape, bool), jnp.asarray(pixels, jnp.float32)


def text_loss(towers, tokens, mask, pixels, num_image):
    """Mean next-token CE over the text positions; logits are computed only where the loss needs them."""
    feats = towers.encode_images("knowledge", pixels)
    hidden = towers("knowledge", tokens, feats, mask)
    logits = towers.logits(hidden[:, num_image - 1:-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, num_image:]).mean()


def timed(fn, steps):
    """Median seconds of `fn()` over `steps` calls after 2 warm-up calls (the first compiles)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times)), compile_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base", choices=("tiny", "base"))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args()

    image_size = 64 if args.preset == "base" else 32
    cfg = getattr(MLLMConfig, args.preset)(args.vocab, image_size)
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, scan_layers=args.scan, remat=args.remat))
    towers = TPADTowers(cfg, image_token_id=IMAGE_TOKEN, rngs=nnx.Rngs(0))
    tokens, mask, pixels = make_batch(cfg, args.batch, args.text)
    num_image = cfg.vision.num_features
    optimizer = nnx.Optimizer(towers, optax.adamw(1e-3), wrt=nnx.LoRAParam)

    @nnx.jit
    def forward(towers):
        return text_loss(towers, tokens, mask, pixels, num_image)

    @nnx.jit
    def train_step(towers, optimizer):
        loss, grads = nnx.value_and_grad(lambda t: text_loss(t, tokens, mask, pixels, num_image),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(towers)
        optimizer.update(towers, grads)
        return loss

    count = sum(x.size for x in jax.tree.leaves(nnx.state(towers.base())))
    count += sum(x.size for x in jax.tree.leaves(nnx.state(towers.towers["knowledge"].projector)))
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(towers.towers["knowledge"], nnx.LoRAParam)))
    tokens_per_step = tokens.size
    fwd_s, fwd_compile = timed(lambda: forward(towers), args.steps)
    step_s, step_compile = timed(lambda: train_step(towers, optimizer), args.steps)
    print(f"preset={args.preset} params={count / 1e6:.2f}M lora={lora:,} "
          f"batch={args.batch}x{tokens.shape[1]} "
          f"({num_image} image tokens) scan={args.scan} remat={args.remat} devices={jax.device_count()}")
    print(f"{'measurement':<22}{'compile s':>10}{'median s':>10}{'tokens/s':>10}")
    rows = (("forward (loss)", fwd_s, fwd_compile), ("LoRA train step", step_s, step_compile))
    for name, median, compile_s in rows:
        print(f"{name:<22}{compile_s:>10.2f}{median:>10.3f}{tokens_per_step / median:>10.0f}")


if __name__ == "__main__":
    main()
