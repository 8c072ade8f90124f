"""Decoder LM: HF config parsing, RoPE, GQA, masks, scan/remat equivalence, tied head and biases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpad_jax.models import llm
from tpad_jax.models.llm import LM, LMConfig


def _tokens(rng, batch, length, vocab):
    return jnp.asarray(rng.integers(1, vocab, size=(batch, length)), dtype=jnp.int32)


@nnx.jit
def _hidden(model, tokens, mask):
    return model(model.embed(tokens), mask)


def test_from_hf_reads_old_and_new_rope_forms_and_llava_defaults():
    common = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    new = LMConfig.from_hf({**common, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"},
                            "head_dim": 32, "tie_word_embeddings": True})
    old = LMConfig.from_hf({**common, "rope_theta": 5e5})
    assert (new.rope_theta, new.head_dim, new.tie_embeddings, new.num_kv_heads) == (1e5, 32, True, 2)
    assert (old.rope_theta, old.head_dim, old.tie_embeddings) == (5e5, 16, False)
    # LLaVA-1.5's text_config lists only a few fields; the rest are LlamaConfig defaults (Vicuna-7B).
    text_config = {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5}
    llava = LMConfig.from_hf({"text_config": text_config})
    assert llava == LMConfig.llama_7b()
    qwen = LMConfig.from_hf({**common, "model_type": "qwen2", "rope_theta": 1e6})
    assert qwen.qkv_bias
    with pytest.raises(ValueError, match="rope_parameters.rope_type"):
        LMConfig.from_hf({**common, "rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3"}})


def test_rope_matches_pairwise_rotation_and_depends_on_relative_position():
    head_dim, theta = 8, 100.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, head_dim)).astype(np.float32)
    cos, sin = llm.rope_tables(jnp.arange(5), head_dim, theta)
    got = np.asarray(llm.apply_rope(jnp.asarray(x), cos, sin))
    half = head_dim // 2
    want = np.empty_like(x)
    for pos in range(5):
        for i in range(half):  # HF rotate_half: dimension i pairs with i + half
            angle = pos * theta ** (-2 * i / head_dim)
            a, b = x[0, pos, :, i], x[0, pos, :, i + half]
            want[0, pos, :, i] = a * np.cos(angle) - b * np.sin(angle)
            want[0, pos, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(got, want, atol=1e-5)
    q, k = jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32), jnp.asarray(
        rng.normal(size=(1, 1, 1, head_dim)), jnp.float32)

    def score(m, n):
        cm, sm = llm.rope_tables(jnp.array([m]), head_dim, theta)
        cn, sn = llm.rope_tables(jnp.array([n]), head_dim, theta)
        return float(jnp.sum(llm.apply_rope(q, cm, sm) * llm.apply_rope(k, cn, sn)))

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)


def test_gqa_equals_mha_with_repeated_kv_and_brute_force_softmax():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32)
    mask = llm.causal_mask(jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool))
    grouped = llm.attend(q, k, v, mask)
    repeated = llm.attend(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask)
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)
    qn, kn, vn, mn = (np.asarray(a) for a in (q, k, v, mask))
    for b, i, h in [(0, 3, 4), (1, 0, 0), (1, 4, 5)]:
        s = qn[b, i, h] @ kn[b, :, h // 3].T / 2.0
        s = np.where(mn[b, i], s, -np.inf)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        np.testing.assert_allclose(grouped[b, i, h], p @ vn[b, :, h // 3], atol=1e-5)


def test_lora_matmul_equals_the_unmerged_form_in_value_and_every_gradient():
    rng = np.random.default_rng(3)
    x, kernel, a, b = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                       for shape in ((2, 5, 6), (6, 7), (6, 3), (3, 7)))

    def unmerged(x, kernel, a, b):
        return x @ kernel + 2.0 * (x @ a @ b)

    def loss(fn):
        return lambda *args: jnp.sum(jnp.sin(fn(*args)))

    np.testing.assert_allclose(llm.lora_matmul(x, kernel, a, b, 2.0), unmerged(x, kernel, a, b), atol=1e-5)
    got = jax.grad(loss(lambda *args: llm.lora_matmul(*args, 2.0)), argnums=(0, 1, 2, 3))(x, kernel, a, b)
    want = jax.grad(loss(unmerged), argnums=(0, 1, 2, 3))(x, kernel, a, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_causal_and_padding_masks():
    cfg = LMConfig.tiny(vocab_size=64)
    model = LM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    tokens = _tokens(rng, 2, 8, 64)
    full = jnp.ones((2, 8), bool)
    base = _hidden(model, tokens, full)
    changed = _hidden(model, tokens.at[:, 5].set((tokens[:, 5] + 1) % 64), full)
    np.testing.assert_allclose(base[:, :5], changed[:, :5], atol=1e-6)
    assert float(jnp.abs(base[:, 5:] - changed[:, 5:]).max()) > 1e-3
    # Right padding: whatever sits in masked positions, valid positions equal the unpadded run.
    pad_mask = jnp.arange(8)[None] < jnp.array([[6], [8]])
    garbage = tokens.at[0, 6:].set(jnp.array([11, 12]))
    padded = _hidden(model, garbage, pad_mask)
    short = _hidden(model, tokens[:1, :6], jnp.ones((1, 6), bool))
    np.testing.assert_allclose(padded[0, :6], short[0], atol=1e-5)
    # A key masked in the middle (an image slot of an item without image) is invisible to later queries.
    holed = pad_mask.at[1, 2].set(False)
    a = _hidden(model, tokens, holed)
    b = _hidden(model, tokens.at[1, 2].set(7), holed)
    np.testing.assert_allclose(a[1, 3:], b[1, 3:], atol=1e-6)


def test_scan_and_remat_equal_unrolled_forward_and_gradients():
    cfg = LMConfig.tiny(vocab_size=64)
    unrolled = LM(cfg, rngs=nnx.Rngs(0))
    scanned = LM(dataclasses.replace(cfg, scan_layers=True, remat=True), rngs=nnx.Rngs(5))
    nnx.update(scanned, nnx.state(unrolled))  # one parameter layout whatever the execution mode
    tokens = _tokens(np.random.default_rng(3), 2, 6, 64)
    mask = jnp.ones((2, 6), bool)

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.sum(m.logits(m(m.embed(tokens), mask)) ** 2) / 1e3)(model)

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(unrolled), loss_and_grads(scanned)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-5)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(ga, gb, atol=1e-5)


def test_rows_equal_the_full_run_at_those_positions_in_value_and_lora_gradients():
    cfg = LMConfig.tiny(vocab_size=64, num_layers=3)
    rng = np.random.default_rng(4)
    tokens = _tokens(rng, 2, 8, 64)
    mask = jnp.arange(8)[None] < jnp.array([[6], [8]])
    for scan in (False, True):
        model = LM(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0))
        lora = llm.make_lora(cfg, rank=2, alpha=4.0, targets=llm.LORA_TARGETS, rngs=nnx.Rngs(1))
        for _, variable in nnx.iter_graph(lora):
            if isinstance(variable, nnx.LoRAParam):  # B starts at 0: give the update an effect
                variable.set_value(variable.get_value() + 0.05)

        def loss(lora, rows):
            hidden = model(model.embed(tokens), mask, lora, rows=rows)
            return jnp.sum(jnp.sin(hidden if rows is not None else hidden[:, 2:7]))

        full, grads_full = nnx.value_and_grad(loss)(lora, None)
        part, grads_part = nnx.value_and_grad(loss)(lora, slice(2, 7))
        # A sum of 2 x 5 x width sines of O(1): float32 rounding of the terms adds up to ~1e-5 in absolute.
        assert float(part) == pytest.approx(float(full), rel=1e-5, abs=1e-4)
        for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads_part)):
            # Float32 sums of O(10) terms: the rounding scales with the largest entries, not with each
            # entry (an AMD EPYC host gave 1.2e-5 on an entry of 0.07 in a leaf reaching 7.7). A wrong
            # row selection differs by O(1).
            scale = max(1.0, float(np.max(np.abs(b))))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_qwen2_style_biases_tied_head_and_free_head_dim():
    cfg = LMConfig.tiny(vocab_size=64, qkv_bias=True, tie_embeddings=True, head_dim=12)
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert model.lm_head is None
    assert model.layers.attn.q.kernel.shape == (2, 32, 48) and model.layers.attn.k.bias.shape == (2, 24)
    assert model.layers.attn.o.bias is None
    hidden = jax.random.normal(jax.random.key(0), (2, 3, 32))
    np.testing.assert_allclose(model.logits(hidden), hidden @ model.embed.embedding[...].T, atol=1e-5)
    tokens = _tokens(np.random.default_rng(4), 2, 5, 64)
    before = _hidden(model, tokens, jnp.ones((2, 5), bool))
    model.layers.attn.k.bias[...] = jnp.ones((2, 24))
    assert float(jnp.abs(_hidden(model, tokens, jnp.ones((2, 5), bool)) - before).max()) > 1e-4


def test_rmsnorm_closed_form():
    norm = llm.RMSNorm(4, eps=1e-6, param_dtype=jnp.float32)
    norm.scale[...] = jnp.array([1.0, 2.0, 0.5, 1.0])
    x = jnp.array([[3.0, -4.0, 0.0, 0.0]])
    rms = np.sqrt((9 + 16) / 4 + 1e-6)
    np.testing.assert_allclose(norm(x), [[3 / rms, -8 / rms, 0.0, 0.0]], rtol=1e-6)
