"""ViT image encoder covering the CLIP and SigLIP vision layouts, with LLaVA feature selection.

CLIP: class token, patch conv without bias, `pre_layrnorm` before the encoder, quick-GELU, LayerNorm eps
1e-5. SigLIP: no class token, patch conv with bias, GELU (tanh approximation), eps 1e-6, optional
attention-pool head. Both: pre-norm encoder layers `x + attn(ln1(x))`, `x + mlp(ln2(x))`, attention
scaled by `head_dim ** -0.5`. The HF `hidden_states` list has the (pre-normed) embeddings at index 0 and
layer i's output at index i; `feature_layer` indexes it (LLaVA uses -2), and only the layers up to it run.

Parameter tree of `VisionEncoder` (kernels `[in, out]`; layer parameters stacked on a leading `[L]`):

    patch.kernel [p, p, 3, D] (+ patch.bias [D] for SigLIP)   torch weight [D, 3, p, p] -> (2, 3, 1, 0)
    class_embedding [D]                   CLIP only
    position_embedding [P (+1), D]
    pre_norm.{scale,bias} [D]             CLIP only (HF `pre_layrnorm`)
    layers.norm1.{scale,bias} [L, D]
    layers.attn.{q,k,v,o}.{kernel [L, D, D], bias [L, D]}
    layers.norm2.{scale,bias} [L, D]
    layers.mlp.fc1.{kernel [L, D, F], bias}  layers.mlp.fc2.{kernel [L, F, D], bias}
    post_norm.{scale,bias} [D]            used by `pooled` only
    head.probe [1, 1, D], head.attn.{q,k,v,o}.*, head.norm.*, head.mlp.{fc1,fc2}.*   SigLIP `use_head`

Pixels arrive in [-1, 1] (NHWC); `image_mean` / `image_std` re-normalise them to what the checkpoint was
trained with (0.5 / 0.5, SigLIP's, is the identity).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tpad_jax.models.llm import INIT_STD, _preset, attend, create_stacked, dense, run_stacked
from tpad_jax.parallel.rules import constrain, partitioned

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT shape, layout (CLIP or SigLIP) and LLaVA feature selection."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    class_token: bool = True
    patch_bias: bool = False
    pre_norm: bool = True
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    use_head: bool = False
    feature_layer: int = -2
    select_strategy: str = "default"  # "default" drops the class token, "full" keeps every token
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} not in {sorted(ACTIVATIONS)}")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"select_strategy {self.select_strategy!r}: use 'default' or 'full'")
        if self.select_strategy == "default" and not self.class_token:
            raise ValueError("select_strategy 'default' drops a class token, but this layout has none; "
                             "use 'full'")
        if not -self.num_layers - 1 <= self.feature_layer <= self.num_layers:
            raise ValueError(f"feature_layer {self.feature_layer} outside "
                             f"[-{self.num_layers + 1}, {self.num_layers}]")

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_positions(self):
        return self.grid_size**2 + int(self.class_token)

    @property
    def num_features(self):
        """Number of tokens `VisionEncoder.__call__` returns per image."""
        return self.num_positions - int(self.select_strategy == "default")

    @property
    def feature_depth(self):
        """How many encoder layers run to produce the selected features."""
        return self.feature_layer % (self.num_layers + 1)

    @classmethod
    def tiny(cls, image_size=32, **overrides):
        """Test-sized CLIP layout: 8x8 patches, d=32, 2 layers."""
        return _preset(cls, overrides, image_size=image_size, patch_size=8, hidden_size=32, num_layers=2,
                       num_heads=2, mlp_size=64)

    @classmethod
    def base(cls, image_size=64, **overrides):
        """CPU default (the perf-anchor shape): CLIP layout, 8x8 patches, d=128, 2 layers, 4 heads."""
        return _preset(cls, overrides, image_size=image_size, patch_size=8, hidden_size=128, num_layers=2,
                       num_heads=4, mlp_size=512)

    @classmethod
    def clip_vit_l_336(cls, **overrides):
        """CLIP ViT-L/14 at 336 px, LLaVA-1.5's vision tower."""
        return _preset(cls, overrides, image_size=336, patch_size=14, hidden_size=1024, num_layers=24,
                       num_heads=16, mlp_size=4096, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)

    @classmethod
    def siglip_base_224(cls, **overrides):
        """SigLIP base patch16 224 with its attention-pool head."""
        return _preset(cls, overrides, image_size=224, patch_size=16, hidden_size=768, num_layers=12,
                       num_heads=12, mlp_size=3072, class_token=False, patch_bias=True, pre_norm=False,
                       activation="gelu_tanh", layer_norm_eps=1e-6, use_head=True, select_strategy="full")


def layer_norm(size, cfg, rngs):
    """nnx.LayerNorm with HF's eps, torch's two-pass variance and logical names on scale and bias."""
    return nnx.LayerNorm(
        size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


class VisionAttention(nnx.Module):
    """Multi-head attention with biases; self-attention or a probe attending to tokens."""

    def __init__(self, cfg, *, rngs):
        self.num_heads = cfg.num_heads
        kw = dict(bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        d = cfg.hidden_size
        self.q = dense(d, d, ("vis_embed", "heads"), **kw)
        self.k = dense(d, d, ("vis_embed", "heads"), **kw)
        self.v = dense(d, d, ("vis_embed", "heads"), **kw)
        self.o = dense(d, d, ("heads", "vis_embed"), **kw)

    def __call__(self, queries, tokens):
        def heads(x):
            return x.reshape(x.shape[:2] + (self.num_heads, -1))

        out = attend(heads(self.q(queries)), heads(self.k(tokens)), heads(self.v(tokens)))
        return self.o(out.reshape(out.shape[:2] + (-1,)))


class VisionMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg, *, rngs):
        kw = dict(bias=True, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.activation = cfg.activation
        self.fc1 = dense(cfg.hidden_size, cfg.mlp_size, ("vis_embed", "vis_mlp"), **kw)
        self.fc2 = dense(cfg.mlp_size, cfg.hidden_size, ("vis_mlp", "vis_embed"), **kw)

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer layer."""

    def __init__(self, cfg, *, rngs):
        self.norm1 = layer_norm(cfg.hidden_size, cfg, rngs)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = layer_norm(cfg.hidden_size, cfg, rngs)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x):
        normed = self.norm1(x)
        x = x + self.attn(normed, normed)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "length", "vis_embed"))


class AttentionPoolHead(nnx.Module):
    """SigLIP's multi-head attention pooling: a learned probe attends to all tokens."""

    def __init__(self, cfg, *, rngs):
        self.probe = nnx.Param(partitioned(nnx.initializers.normal(INIT_STD), (None, None, "vis_embed"))(
            rngs.params(), (1, 1, cfg.hidden_size), jnp.dtype(cfg.param_dtype)))
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm = layer_norm(cfg.hidden_size, cfg, rngs)
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, tokens):
        probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        pooled = self.attn(probe, tokens)
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]


class VisionEncoder(nnx.Module):
    """`(pixels [B, H, W, 3] in [-1, 1]) -> [B, num_features, D]` after LLaVA feature selection."""

    def __init__(self, cfg, *, rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.patch = nnx.Conv(
            3, cfg.hidden_size, kernel_size=(cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
            padding="VALID",
            use_bias=cfg.patch_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=partitioned(nnx.initializers.normal(INIT_STD), (None, None, None, "vis_embed")),
            bias_init=partitioned(nnx.initializers.zeros_init(), ("vis_embed",)))
        normal = nnx.initializers.normal(INIT_STD)
        self.class_embedding = nnx.Param(partitioned(normal, ("vis_embed",))(
            rngs.params(), (cfg.hidden_size,), param_dtype)) if cfg.class_token else None
        self.position_embedding = nnx.Param(partitioned(normal, ("patch", "vis_embed"))(
            rngs.params(), (cfg.num_positions, cfg.hidden_size), param_dtype))
        self.pre_norm = layer_norm(cfg.hidden_size, cfg, rngs) if cfg.pre_norm else None
        self.layers = create_stacked(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.post_norm = layer_norm(cfg.hidden_size, cfg, rngs)
        self.head = AttentionPoolHead(cfg, rngs=rngs) if cfg.use_head else None

    def embed_patches(self, pixels):
        """Patch + class + position embeddings (pre-normed for CLIP): HF `hidden_states[0]`."""
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels: expected [B, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {pixels.shape}")
        mean, std = jnp.asarray(cfg.image_mean), jnp.asarray(cfg.image_std)
        x = ((pixels + 1.0) / 2.0 - mean) / std
        x = self.patch(x.astype(jnp.dtype(cfg.dtype)))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # row-major patch order, as torch's flatten(2)
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding[...].astype(x.dtype)
        return x if self.pre_norm is None else self.pre_norm(x)

    def hidden_state(self, pixels, depth):
        """HF `hidden_states[depth]`: the output of the first `depth` encoder layers."""
        x = constrain(self.embed_patches(pixels), ("batch", "length", "vis_embed"))
        return run_stacked(lambda h, layer: layer(h), x, (self.layers,), scan=self.cfg.scan_layers,
                           remat=self.cfg.remat, layers=slice(depth))

    def __call__(self, pixels):
        features = self.hidden_state(pixels, self.cfg.feature_depth)
        return features[:, 1:] if self.cfg.select_strategy == "default" else features

    def pooled(self, pixels):
        """Image-level embedding [B, D]: CLIP's post-normed class token, or SigLIP's attention-pool head."""
        last = self.post_norm(self.hidden_state(pixels, self.cfg.num_layers))
        if self.head is not None:
            return self.head(last)
        if not self.cfg.class_token:
            raise ValueError("pooled: this layout has neither a class token nor an attention-pool head")
        return last[:, 0]
