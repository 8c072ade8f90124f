"""Decoder-only language model (Llama / Mistral / Qwen2 layout) with per-layer LoRA sets, in flax.nnx.

HF semantics are mirrored exactly: RMSNorm computed in float32 (`weight * x * rsqrt(mean(x^2) + eps)`),
RoPE with the `rotate_half` convention (first half / second half of each head, not interleaved),
attention scaled by `head_dim ** -0.5` with a float32 softmax, SwiGLU MLP `down(silu(gate(x)) * up(x))`,
grouped-query attention where kv head j serves query heads `j*G .. j*G+G-1` (HF `repeat_kv`).

Parameter tree of `LM` (kernels are `[in, out]`, i.e. the transpose of torch's `weight`; every layer
parameter has a leading `[num_layers]` axis, whether or not the layers are run with `scan`):

    embed.embedding                  [vocab, hidden]                   (vocab, embed)
    layers.input_norm.scale          [L, hidden]
    layers.attn.q.kernel             [L, hidden, heads*head_dim]       (layers, embed, heads)
    layers.attn.k.kernel / v.kernel  [L, hidden, kv_heads*head_dim]    (layers, embed, kv)
    layers.attn.{q,k,v}.bias         [L, out]                          only with qkv_bias (Qwen2)
    layers.attn.o.kernel             [L, heads*head_dim, hidden]       (layers, heads, embed)
    layers.post_attention_norm.scale [L, hidden]
    layers.mlp.gate.kernel / up      [L, hidden, mlp]                  (layers, embed, mlp)
    layers.mlp.down.kernel           [L, mlp, hidden]                  (layers, mlp, embed)
    norm.scale                       [hidden]
    lm_head.kernel                   [hidden, vocab]                   only when embeddings are untied

A LoRA set (`make_lora`) has, per target t in (q, k, v, o, gate, up, down):
`t.lora_a [L, in, rank]` (layers, <in axis>, lora_rank) and `t.lora_b [L, rank, out]`, both `nnx.LoRAParam`;
its update `(alpha / rank) * a @ b` is merged into the kernel of projection t (`lora_matmul`), which is
the base projection's output plus `(alpha / rank) * x @ a @ b`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tpad_jax.parallel.rules import constrain, param_metadata, partitioned

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# HF initializer_range: random weights look like an untrained HF model (and are cheap to compile).
INIT_STD = 0.02

# Values that HF config classes fill in when config.json omits them (LLaVA's text_config often does).
_HF_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False),
}


def _preset(cls, overrides, **fields):
    """cls(**fields) with `overrides` taking precedence: every preset accepts any field as an override."""
    return cls(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shape and numerics of the decoder; `head_dim=None` means hidden_size // num_heads."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_size: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @classmethod
    def tiny(cls, vocab_size, **overrides):
        """Test-sized: d=32, 2 layers, 4 query / 2 kv heads."""
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, mlp_size=64)

    @classmethod
    def base(cls, vocab_size, **overrides):
        """CPU default: d=128, 2 layers, 4 query / 2 kv heads (about 0.4 M parameters + embeddings).

        Sized so that stage 2 (four variants) fits in minutes on a 2-core laptop CPU; the synthetic
        catalogue's text needs no more.
        """
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, mlp_size=384)

    @classmethod
    def llama_7b(cls, vocab_size=32064, **overrides):
        """Vicuna-7B v1.5 as in LLaVA-1.5-7B (vocab 32000 padded to 32064 for the image token)."""
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=4096, num_layers=32, num_heads=32,
                       num_kv_heads=32, mlp_size=11008, rms_norm_eps=1e-5)

    @classmethod
    def tinyllama_1_1b(cls, vocab_size=32064, **overrides):
        """TinyLlama-1.1B's shape (Llama-2 architecture, 4 kv heads), vocab padded like LLaVA's."""
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=2048, num_layers=22, num_heads=32,
                       num_kv_heads=4, mlp_size=5632, rms_norm_eps=1e-5)

    @classmethod
    def qwen2_0_5b(cls, vocab_size=151936, **overrides):
        """Qwen2-0.5B: q/k/v biases, tied embeddings, theta 1e6."""
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=896, num_layers=24, num_heads=14,
                       num_kv_heads=2, mlp_size=4864, rope_theta=1e6, qkv_bias=True, tie_embeddings=True)

    @classmethod
    def smollm2_135m(cls, vocab_size=49152, **overrides):
        """SmolLM2-135M (Llama architecture): 9 query / 3 kv heads, theta 1e5, tied embeddings."""
        return _preset(cls, overrides, vocab_size=vocab_size, hidden_size=576, num_layers=30, num_heads=9,
                       num_kv_heads=3, mlp_size=1536, rope_theta=1e5, rms_norm_eps=1e-5, tie_embeddings=True)

    @classmethod
    def from_hf(cls, hf, **overrides):
        """Builds the config from an HF `config.json` dict (Llama, Mistral, Qwen2, or LLaVA's text_config).

        Reads the RoPE base from the transformers-5 `rope_parameters` dict or the older top-level
        `rope_theta`; only the default (unscaled) RoPE type is supported.
        """
        hf = hf.get("text_config", hf)
        model_type = hf.get("model_type", "llama")
        if model_type not in _HF_DEFAULTS:
            raise ValueError(f"config.json: field 'model_type': {model_type!r} is not one of "
                             f"{sorted(_HF_DEFAULTS)}")
        hf = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json: field 'rope_parameters.rope_type': {rope_type!r} is not "
                             "supported (only 'default')")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            mlp_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            rope_theta=float(rope.get("rope_theta", hf["rope_theta"])),
            rms_norm_eps=hf["rms_norm_eps"],
            qkv_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            tie_embeddings=hf["tie_word_embeddings"],
            **overrides,
        )


# ------------------------------------------------------------------------------------------ pure math


def attend(q, k, v, mask=None):
    """Softmax attention with grouped kv heads.

    The G query heads of kv head j are stacked along the length axis, so both products are batched
    matmuls over [B, Hkv] on head-major operands: XLA CPU surrounds the equivalent 5-D grouped einsums
    with more transposes, forward and backward (7 % of a LoRA train step of the perf-anchor model).

    Args:
      q: [B, L, Hq, D] queries; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv.
      mask: bool [B, L, S] (True = may attend) or None.
    Returns:
      [B, L, Hq, D].
    """
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * length, head_dim)
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k).astype(jnp.float32) * head_dim**-0.5
    if mask is not None:
        # A large finite value (as HF does) keeps fully masked rows finite instead of NaN.
        grouped_mask = jnp.tile(mask[:, None], (1, 1, groups, 1))
        scores = jnp.where(grouped_mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v)
    out = out.reshape(batch, kv_heads, groups, length, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, q_heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lora_matmul(x, kernel, lora_a, lora_b, scale):
    """x @ (kernel + scale * lora_a @ lora_b) in x's dtype: a LoRA-adapted projection as one matmul.

    The forward merges the rank-r update into the kernel: one matmul, where the unmerged form costs
    three and a [tokens, out] update to add. The backward stays low-rank (`_lora_matmul_bwd`).
    """
    return x @ _merged_kernel(kernel, lora_a, lora_b, scale, x.dtype)


def _merged_kernel(kernel, lora_a, lora_b, scale, dtype):
    return (kernel + scale * (lora_a @ lora_b)).astype(dtype)


def _lora_matmul_fwd(x, kernel, lora_a, lora_b, scale):
    return lora_matmul(x, kernel, lora_a, lora_b, scale), (x, kernel, lora_a, lora_b)


def _lora_matmul_bwd(scale, residuals, grad):
    """Factor gradients through rank-r products, never through a kernel-sized weight gradient.

    Tokens are flattened to rows: XLA CPU turns a contraction over [batch, length] into a strided
    transpose fused into the cotangent's producer, three times slower. The kernel's own gradient
    (full fine-tuning) is left to XLA to drop when nothing reads it.
    """
    x, kernel, lora_a, lora_b = residuals
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    grad_x = grad @ _merged_kernel(kernel, lora_a, lora_b, scale, grad.dtype).T
    grad_through_b = grad_rows @ lora_b.astype(grad.dtype).T
    # Contractions over the rows as einsums: on XLA CPU these rank-r products run about a quarter faster
    # than the `rows.T @ ...` forms (measured alone, 2 cores).
    grad_a = scale * jnp.einsum("nr,nd->dr", grad_through_b, rows)
    grad_b = scale * jnp.einsum("nr,nf->rf", rows @ lora_a.astype(x.dtype), grad_rows)
    grad_kernel = jnp.einsum("nd,nf->df", rows, grad_rows)
    return (grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype), grad_a.astype(lora_a.dtype),
            grad_b.astype(lora_b.dtype))


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def rope_tables(positions, head_dim, theta):
    """cos/sin tables [..., L, head_dim] for integer positions [..., L] (HF default RoPE)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates x [B, L, H, D] by tables [L, D] or [B, L, D] with HF's rotate_half convention."""
    cos = jnp.broadcast_to(cos, x.shape[:2] + cos.shape[-1:])
    sin = jnp.broadcast_to(sin, x.shape[:2] + sin.shape[-1:])
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def causal_mask(attention_mask):
    """bool [B, L, L]: query i sees key j iff j <= i and key j is not padding."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None] & attention_mask[:, None, :].astype(bool)


# ------------------------------------------------------------------------------- stacked layers


def create_stacked(make_layer, num_layers, rngs):
    """Creates `num_layers` copies of `make_layer(rngs)` with every parameter stacked on a leading axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs):
        return make_layer(layer_rngs)

    return make(rngs)


def run_stacked(step, x, stacks, *, scan, remat, layers=slice(None)):
    """Applies `step(x, *layers) -> x` layer by layer over stacked modules (a module or None each).

    `scan=True` compiles one layer body (compile time independent of depth); `scan=False` unrolls.
    `remat=True` recomputes each layer's activations in the backward pass. `layers` (a slice) picks
    the layers that run: `slice(depth)` the first `depth`, `slice(-1, None)` the last.
    """
    graphdefs, states = zip(*(nnx.split(m) if m is not None else (None, None) for m in stacks))
    states = jax.tree.map(lambda a: a[layers], states)
    num_layers = jax.tree.leaves(states)[0].shape[0]
    if num_layers == 0:
        return x

    def body(h, layer_states):
        layers = [nnx.merge(g, s) if g is not None else None for g, s in zip(graphdefs, layer_states)]
        return step(h, *layers), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, x, states)[0]
    for i in range(num_layers):
        x, _ = body(x, jax.tree.map(lambda a: a[i], states))
    return x


# ------------------------------------------------------------------------------------------ modules


def dense(in_features, out_features, names, *, bias, dtype, param_dtype, rngs):
    """nnx.Linear with logical axis names on its kernel (and bias)."""
    return nnx.Linear(
        in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.normal(INIT_STD), names),
        bias_init=partitioned(nnx.initializers.zeros_init(), names[-1:]), rngs=rngs)


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, size, *, eps, param_dtype):
        self.eps = eps
        ones = partitioned(nnx.initializers.ones_init(), ("norm",))
        self.scale = nnx.Param(ones(None, (size,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class LoRABlock(nnx.Module):
    """One layer's LoRA adapters: an `nnx.LoRA` (no base module) per targeted projection.

    The modules hold the factors (and their sharding metadata); `lora_matmul` applies them.
    """

    def __init__(self, cfg, rank, alpha, targets, *, rngs):
        unknown = set(targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets: unknown {sorted(unknown)}; choose from {LORA_TARGETS}")
        self.targets = tuple(targets)
        self.scale = alpha / rank
        for target in self.targets:
            (in_features, in_axis), (out_features, out_axis) = _projection_axes(cfg)[target]
            setattr(self, target, nnx.LoRA(
                in_features, rank, out_features, rngs=rngs,
                a_metadata=param_metadata((in_axis, "lora_rank")),
                b_metadata=param_metadata(("lora_rank", out_axis))))

    def factors(self, target):
        """(lora_a, lora_b) of projection `target`, or None when it is not targeted."""
        if target not in self.targets:
            return None
        lora = getattr(self, target)
        return lora.lora_a[...], lora.lora_b[...]


def _projection_axes(cfg):
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d, f = (cfg.hidden_size, "embed"), (cfg.mlp_size, "mlp")
    return {"q": (d, (q_out, "heads")), "k": (d, (kv_out, "kv")), "v": (d, (kv_out, "kv")),
            "o": ((q_out, "heads"), d), "gate": (d, f), "up": (d, f), "down": (f, d)}


def _project(module, target, x, lora):
    """module(x) (an nnx.Linear), with the LoRA update of `target` merged into its kernel when set."""
    factors = None if lora is None else lora.factors(target)
    if factors is None:
        return module(x)
    out = lora_matmul(x.astype(module.dtype), module.kernel[...], *factors, lora.scale)
    return out if module.bias is None else out + module.bias[...].astype(out.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, cfg, *, rngs):
        self.cfg = cfg
        axes = _projection_axes(cfg)
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        for name in ("q", "k", "v", "o"):
            (n_in, a_in), (n_out, a_out) = axes[name]
            setattr(self, name, dense(n_in, n_out, (a_in, a_out), bias=cfg.qkv_bias and name != "o", **kw))

    def __call__(self, x, mask, cos, sin, lora=None, rows=None):
        """Attention output at every position, or only at the positions of `rows` (a static slice):
        the queries of those rows attend to the keys and values of all."""
        batch, length, _ = x.shape
        cfg = self.cfg
        queries, q_cos, q_sin = x, cos, sin
        if rows is not None:
            queries, mask, q_cos, q_sin = x[:, rows], mask[:, rows], cos[..., rows, :], sin[..., rows, :]
        q = _project(self.q, "q", queries, lora).reshape(batch, -1, cfg.num_heads, cfg.head_dim)
        k = _project(self.k, "k", x, lora).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = _project(self.v, "v", x, lora).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        out = attend(apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin), v, mask)
        return _project(self.o, "o", out.reshape(batch, queries.shape[1], -1), lora)


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg, *, rngs):
        axes = _projection_axes(cfg)
        kw = dict(bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        for name in ("gate", "up", "down"):
            (n_in, a_in), (n_out, a_out) = axes[name]
            setattr(self, name, dense(n_in, n_out, (a_in, a_out), **kw))

    def __call__(self, x, lora=None):
        hidden = jax.nn.silu(_project(self.gate, "gate", x, lora)) * _project(self.up, "up", x, lora)
        return _project(self.down, "down", hidden, lora)


class Block(nnx.Module):
    """Pre-norm decoder layer."""

    def __init__(self, cfg, *, rngs):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, cos, sin, lora=None, rows=None):
        """The layer's output at every position, or only at those of `rows` (a static slice)."""
        normed = self.input_norm(x)
        x = x if rows is None else x[:, rows]
        x = x + self.attn(normed, mask, cos, sin, lora, rows)
        x = x + self.mlp(self.post_attention_norm(x), lora)
        return constrain(x, ("batch", "length", "embed"))


def make_lora(cfg, *, rank, alpha, targets, rngs):
    """A LoRA set for every layer of an LM with config `cfg` (B = 0, so a fresh set changes nothing)."""
    return create_stacked(lambda r: LoRABlock(cfg, rank, alpha, targets, rngs=r), cfg.num_layers, rngs)


class LM(nnx.Module):
    """Decoder-only LM: `embed(tokens)`, `__call__(embeds, attention_mask, lora) -> hidden`, `logits`."""

    def __init__(self, cfg, *, rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=partitioned(nnx.initializers.normal(INIT_STD), ("vocab", "embed")))
        self.layers = create_stacked(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_embeddings else dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, embeds, attention_mask, lora=None, rows=None):
        """Final-normed hidden states [B, L, D] of input embeddings [B, L, D] (right padding, mask False).

        `rows` (a static slice of positions) returns only those positions' states: the last layer then
        computes queries, attention output and MLP for those rows alone, the work whose result a loss
        reading a few positions would discard (keys and values still cover every position).
        """
        x = constrain(embeds.astype(jnp.dtype(self.cfg.dtype)), ("batch", "length", "embed"))
        mask = causal_mask(attention_mask)
        # HF computes positions as arange(L) whatever the mask; holes (masked image slots) keep their index.
        cos, sin = rope_tables(jnp.arange(x.shape[1]), self.cfg.head_dim, self.cfg.rope_theta)

        def step(h, block, layer_lora, rows=None):
            return block(h, mask, cos, sin, layer_lora, rows)

        stacks, layout = (self.layers, lora), dict(scan=self.cfg.scan_layers, remat=self.cfg.remat)
        if rows is None:
            return self.norm(run_stacked(step, x, stacks, **layout))
        x = run_stacked(step, x, stacks, **layout, layers=slice(-1))
        # The last layer changes the length, so it cannot be a step of the scan.
        x = run_stacked(functools.partial(step, rows=rows), x, stacks, scan=False, remat=self.cfg.remat,
                        layers=slice(-1, None))
        return self.norm(x)

    def logits(self, hidden):
        """float32 logits [..., vocab] of hidden states."""
        out = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)
