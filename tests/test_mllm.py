"""TPAD towers: shared frozen base, per-tower LoRA and projector, image slots, pooling, presets' size."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tpad_base
from tpad_jax.models import mllm
from tpad_jax.models.mllm import MLLMConfig, TPADTowers

IMAGE = 3
VOCAB = 64


def _towers(**overrides):
    return TPADTowers(MLLMConfig.tiny(VOCAB, **overrides), image_token_id=IMAGE, rngs=nnx.Rngs(0))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, size=(2, 10))
    tokens[:, 1:3] = IMAGE  # two image slots per row
    tokens[1, 6] = IMAGE  # a third in row 1
    mask = np.ones((2, 10), bool)
    mask[0, 8:] = False
    pixels = jax.random.uniform(jax.random.key(seed), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), pixels


def _loss(towers, tower, tokens, mask, pixels):
    feats = towers.encode_images(tower, pixels, pool_to=4)[:, :3]
    logits = towers.logits(towers(tower, tokens, feats, mask), tower)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(ce * mask[:, 1:]) / jnp.sum(mask[:, 1:])


def _snapshot(towers, what):
    return {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(towers, what))}


def test_shared_base_is_one_copy_and_a_step_on_one_tower_moves_only_its_lora():
    towers = _towers()
    assert towers.base("knowledge") is towers.base("transfer")
    pointer = towers.base("knowledge").lm.layers.mlp.gate.kernel[...].unsafe_buffer_pointer()
    assert towers.base("transfer").lm.layers.mlp.gate.kernel[...].unsafe_buffer_pointer() == pointer
    frozen, lora = _snapshot(towers, nnx.Not(nnx.LoRAParam)), _snapshot(towers, nnx.LoRAParam)
    optimizer = nnx.Optimizer(towers, optax.adam(1e-2), wrt=nnx.LoRAParam)
    tokens, mask, pixels = _batch()

    @nnx.jit
    def step(towers, optimizer):
        loss, grads = nnx.value_and_grad(lambda t: _loss(t, "knowledge", tokens, mask, pixels),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(towers)
        optimizer.update(towers, grads)
        return loss

    step(towers, optimizer)
    for path, value in _snapshot(towers, nnx.Not(nnx.LoRAParam)).items():
        np.testing.assert_array_equal(value, frozen[path], err_msg=str(path))
    moved = {path[1] for path, value in _snapshot(towers, nnx.LoRAParam).items()
             if not np.array_equal(value, lora[path])}
    assert moved == {"knowledge"}
    k_lora, t_lora = towers.towers["knowledge"].lora, towers.towers["transfer"].lora
    assert float(jnp.abs(k_lora.down.lora_b[...] - t_lora.down.lora_b[...]).max()) > 0


def test_fresh_tower_equals_the_base_model_and_fills_image_slots_in_order():
    towers = _towers()
    tokens, mask, pixels = _batch(1)
    feats = towers.encode_images("transfer", pixels)  # [2, 16, D]
    hidden = towers("transfer", tokens, feats, mask)
    lm = towers.base().lm
    embeds = np.array(lm.embed(tokens))
    for b in range(2):
        for j, pos in enumerate(np.flatnonzero(np.asarray(tokens[b]) == IMAGE)):
            embeds[b, pos] = feats[b, j]
    np.testing.assert_allclose(hidden, lm(jnp.asarray(embeds), mask), atol=1e-5)  # B = 0: no LoRA effect
    towers.towers["transfer"].lora.q.lora_b[...] = jnp.ones_like(towers.towers["transfer"].lora.q.lora_b[...])
    assert float(jnp.abs(towers("transfer", tokens, feats, mask) - hidden).max()) > 1e-3
    np.testing.assert_allclose(towers("knowledge", tokens, feats, mask), hidden, atol=1e-6)


def test_pool_tokens_matches_brute_force_adaptive_average():
    rng = np.random.default_rng(2)
    for grid, m in [(4, 4), (4, 1), (4, 2), (3, 4), (6, 9)]:
        tokens = rng.normal(size=(2, grid * grid, 5)).astype(np.float32)
        got = np.asarray(mllm.pool_tokens(jnp.asarray(tokens), m))
        rows = max(d for d in range(1, m + 1) if m % d == 0 and d * d <= m)
        cols = m // rows
        cells = tokens.reshape(2, grid, grid, 5)

        def span(i, bins):  # torch adaptive_avg_pool2d: [floor(i*g/bins), ceil((i+1)*g/bins))
            return slice(int(np.floor(i * grid / bins)), int(np.ceil((i + 1) * grid / bins)))

        want = np.stack([cells[:, span(i, rows), span(j, cols)].mean(axis=(1, 2))
                         for i in range(rows) for j in range(cols)], axis=1)
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        mllm.pool_tokens(jnp.zeros((1, 17, 4)), 4)


def test_unshared_bases_start_as_copies_and_text_only_towers_skip_vision():
    towers = _towers(share_base=False)
    knowledge, transfer = towers.base("knowledge"), towers.base("transfer")
    assert knowledge is not transfer
    k, t = knowledge.lm.embed.embedding[...], transfer.lm.embed.embedding[...]
    assert k.unsafe_buffer_pointer() != t.unsafe_buffer_pointer()
    np.testing.assert_array_equal(k, t)
    with pytest.raises(ValueError, match="tower"):
        towers.base()
    text = TPADTowers(MLLMConfig(vision=None, lm=MLLMConfig.tiny(VOCAB).lm), image_token_id=IMAGE,
                      rngs=nnx.Rngs(0))
    assert text.base().vision is None and text.towers["knowledge"].projector is None
    with pytest.raises(ValueError, match="vision=None"):
        text.encode_images("knowledge", jnp.zeros((1, 32, 32, 3)))
    tokens, mask, _ = _batch()
    assert text("knowledge", tokens, None, mask).shape == (2, 10, 32)


def test_config_from_the_run_config():
    config = tpad_base.get_config("tiny")
    cfg = mllm.config_from(config.model, vocab_size=400, image_size=config.data.image_size)
    assert (cfg.lm.vocab_size, cfg.vision.image_size, cfg.lora_rank, cfg.dtype) == (400, 32, 4, "float32")
    towers = TPADTowers(cfg, image_token_id=IMAGE, rngs=nnx.Rngs(0))
    lora = nnx.state(towers, nnx.LoRAParam)
    rank, d, f = 4, 32, 64
    kv = d // 2  # 2 kv heads of 8
    per_layer = rank * ((d + d) + 2 * (d + kv) + (d + d) + 3 * (d + f))  # q, k+v, o, gate+up+down
    assert sum(x.size for x in jax.tree.leaves(lora)) == 2 * 2 * per_layer  # 2 towers x 2 layers
    config.model.preset = "smollm2_text"  # a real model keeps its vocabulary: the tokenizer must fit
    with pytest.raises(ValueError, match="exceeds the model's 49152"):
        mllm.config_from(config.model, vocab_size=50_000, image_size=32)


def test_llava_1_5_7b_preset_has_the_real_parameter_count_without_allocating():
    abstract = nnx.eval_shape(lambda: TPADTowers(MLLMConfig.llava_1_5_7b(), image_token_id=32000,
                                                 rngs=nnx.Rngs(0)))
    base = nnx.state(abstract.base())
    projector = nnx.state(abstract.towers["knowledge"].projector)
    count = sum(x.size for x in jax.tree.leaves(base)) + sum(x.size for x in jax.tree.leaves(projector))
    flat = [(".".join(map(str, p)), v.shape) for p, v in nnx.to_flat_state(base)]
    for name, shape in sorted(flat, key=lambda item: -np.prod(item[1]))[:4]:
        print(f"{name:45s} {shape}")
    print(f"LLaVA-1.5-7B parameters: {count:,}")
    # llava-hf/llava-1.5-7b-hf: 7,063,427,072 (CLIP ViT-L/14-336 303.5 M + projector 21.0 M + Vicuna 6.74 B).
    assert abs(count - 7_063_427_072) / 7_063_427_072 < 0.005
