"""ViT: CLIP / SigLIP layouts against a NumPy reference, LLaVA feature selection, activations, head."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpad_jax.models.vision import ACTIVATIONS, VisionConfig, VisionEncoder


def _np(v):
    return np.asarray(v[...], dtype=np.float64)


def _layer_norm(x, norm, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _np(norm.scale) + _np(norm.bias)


def _reference_features(encoder, pixels, depth):
    """NumPy HF-style forward: patches in torch's flatten order, class token, pre-norm, `depth` layers."""
    cfg = encoder.cfg
    p, g, d = cfg.patch_size, cfg.grid_size, cfg.hidden_size
    x = (np.asarray(pixels, np.float64) + 1) / 2
    x = (x - np.array(cfg.image_mean)) / np.array(cfg.image_std)
    patches = x.reshape(x.shape[0], g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], g * g, -1)
    tokens = patches @ _np(encoder.patch.kernel).reshape(-1, d)
    if cfg.patch_bias:
        tokens = tokens + _np(encoder.patch.bias)
    if cfg.class_token:
        cls = np.broadcast_to(_np(encoder.class_embedding), (x.shape[0], 1, d))
        tokens = np.concatenate([cls, tokens], axis=1)
    h = tokens + _np(encoder.position_embedding)
    if cfg.pre_norm:
        h = _layer_norm(h, encoder.pre_norm, cfg.layer_norm_eps)
    act = {"quick_gelu": lambda a: a / (1 + np.exp(-1.702 * a)),
           "gelu_tanh": lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))}
    layer = encoder.layers  # stacked: parameter [L, ...]; layer i is index i
    for i in range(depth):

        def w(mod, name):
            return np.asarray(getattr(mod, name)[...][i], np.float64)

        normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + cfg.layer_norm_eps)
        normed = normed * w(layer.norm1, "scale") + w(layer.norm1, "bias")
        heads = cfg.num_heads

        def split(proj):
            out = normed @ w(proj, "kernel") + w(proj, "bias")
            return out.reshape(out.shape[0], out.shape[1], heads, -1)

        q, k, v = split(layer.attn.q), split(layer.attn.k), split(layer.attn.v)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        attn = np.einsum("bhqk,bkhd->bqhd", prob, v).reshape(h.shape)
        h = h + attn @ w(layer.attn.o, "kernel") + w(layer.attn.o, "bias")
        normed = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + cfg.layer_norm_eps)
        normed = normed * w(layer.norm2, "scale") + w(layer.norm2, "bias")
        hidden = act[cfg.activation](normed @ w(layer.mlp.fc1, "kernel") + w(layer.mlp.fc1, "bias"))
        h = h + hidden @ w(layer.mlp.fc2, "kernel") + w(layer.mlp.fc2, "bias")
    return h


def _pixels(batch, size, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1.0, maxval=1.0)


@nnx.jit
def _features(encoder, pixels):
    return encoder(pixels)


def test_clip_layout_matches_reference_and_selects_layer_minus_two_without_cls():
    cfg = VisionConfig.tiny(image_size=32, image_mean=(0.48, 0.45, 0.4), image_std=(0.27, 0.26, 0.28))
    encoder = VisionEncoder(cfg, rngs=nnx.Rngs(0))
    pixels = _pixels(2, 32)
    features = _features(encoder, pixels)
    assert features.shape == (2, 16, 32) and cfg.num_features == 16
    want = _reference_features(encoder, pixels, depth=1)  # hidden_states[-2] of 2 layers = after layer 1
    np.testing.assert_allclose(features, want[:, 1:], atol=2e-4)
    last_layer_all_tokens = dataclasses.replace(cfg, select_strategy="full", feature_layer=-1)
    encoder_full = VisionEncoder(last_layer_all_tokens, rngs=nnx.Rngs(0))
    nnx.update(encoder_full, nnx.state(encoder))
    np.testing.assert_allclose(_features(encoder_full, pixels), _reference_features(encoder, pixels, 2),
                               atol=2e-4)


def test_siglip_layout_patch_bias_no_class_token_and_attention_pool_head():
    cfg = VisionConfig.tiny(16, patch_size=4, class_token=False, patch_bias=True, pre_norm=False,
                            activation="gelu_tanh", layer_norm_eps=1e-6, use_head=True,
                            select_strategy="full", scan_layers=True)
    encoder = VisionEncoder(cfg, rngs=nnx.Rngs(1))
    encoder.patch.bias[...] = jnp.linspace(-1, 1, 32)  # zero-initialised; make it matter
    assert encoder.class_embedding is None and encoder.position_embedding.shape == (16, 32)
    pixels = _pixels(2, 16, seed=1)
    np.testing.assert_allclose(_features(encoder, pixels), _reference_features(encoder, pixels, 1), atol=2e-4)
    pooled_fn = nnx.jit(lambda enc, px: enc.pooled(px))
    pooled = pooled_fn(encoder, pixels)
    assert pooled.shape == (2, 32) and bool(jnp.all(jnp.isfinite(pooled)))
    # The head attends over every token: changing one patch changes the pooled vector.
    other = pooled_fn(encoder, pixels.at[0, :4, :4].set(0.0))
    assert float(jnp.abs(other[0] - pooled[0]).max()) > 1e-5
    np.testing.assert_allclose(other[1], pooled[1], atol=1e-6)


def test_activations_closed_form_and_config_errors():
    x = jnp.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(ACTIVATIONS["quick_gelu"](x), x / (1 + jnp.exp(-1.702 * x)), rtol=1e-6)
    tanh_gelu = 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x), tanh_gelu, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="class token"):
        VisionConfig.tiny(class_token=False)
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig.tiny(image_size=30)
    encoder = VisionEncoder(VisionConfig.tiny(image_size=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pixels"):
        encoder(jnp.zeros((1, 32, 32, 3)))


def test_presets_token_counts():
    assert VisionConfig.clip_vit_l_336().num_features == 576
    assert VisionConfig.clip_vit_l_336().feature_depth == 23
    assert VisionConfig.siglip_base_224().num_features == 196
