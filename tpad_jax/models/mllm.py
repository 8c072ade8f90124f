"""The two TPAD towers: one frozen multimodal base (ViT + LM), and per tower a projector and a LoRA set.

    towers = TPADTowers(MLLMConfig.tiny(vocab_size=400), image_token_id=3, rngs=nnx.Rngs(0))
    feats = towers.encode_images("knowledge", pixels, pool_to=None | m)     # [B, T, D_lm]
    hidden = towers("knowledge", tokens, feats, attention_mask)             # [B, L, D_lm]
    logits = towers.logits(hidden)

Parameter tree (see `vision.py` / `llm.py` for the insides of `vision`, `lm` and `lora`):

    bases.shared.vision / bases.shared.lm               share_base=True: one copy for both towers
    bases.knowledge.* / bases.transfer.*                share_base=False: one copy per tower
    towers.{knowledge,transfer}.projector.linear_1.{kernel [Dv, D], bias}   LLaVA `multi_modal_projector`
    towers.{knowledge,transfer}.projector.linear_2.{kernel [D, D], bias}
    towers.{knowledge,transfer}.lora.{q,k,v,o,gate,up,down}.{lora_a, lora_b}   nnx.LoRAParam

Base and projector weights are `nnx.Param`, LoRA weights `nnx.LoRAParam` (a Param subclass); what trains
is `train.optim.trainable_filter`'s choice.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tpad_jax.models.llm import LM, LORA_TARGETS, LMConfig, dense, make_lora
from tpad_jax.models.vision import VisionConfig, VisionEncoder

TOWERS = ("knowledge", "transfer")


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """Vision tower (None: text-only catalogue), LM, projector and LoRA settings of both towers."""

    vision: VisionConfig | None
    lm: LMConfig
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = LORA_TARGETS
    share_base: bool = True
    # Storage dtype of the frozen base's weights (None: lm.param_dtype, as the towers' own parameters).
    # bfloat16 halves the base's memory; LoRA, projectors and heads stay in lm.param_dtype.
    base_param_dtype: str | None = None

    @property
    def dtype(self):
        return self.lm.dtype

    def with_dtype(self, dtype, param_dtype=None):
        """The same config computing in `dtype` (and storing parameters in `param_dtype` when given)."""
        change = dict(dtype=dtype, **({"param_dtype": param_dtype} if param_dtype else {}))
        vision = None if self.vision is None else dataclasses.replace(self.vision, **change)
        return dataclasses.replace(self, vision=vision, lm=dataclasses.replace(self.lm, **change))

    @classmethod
    def tiny(cls, vocab_size, image_size=32, **overrides):
        """Test-sized towers."""
        return cls(vision=VisionConfig.tiny(image_size), lm=LMConfig.tiny(vocab_size), lora_rank=4,
                   **overrides)

    @classmethod
    def base(cls, vocab_size, image_size=64, **overrides):
        """CPU default: CLIP-layout ViT d=128 over 64 patches, LM d=128 x 2 layers."""
        return cls(vision=VisionConfig.base(image_size), lm=LMConfig.base(vocab_size), **overrides)

    @classmethod
    def llava_1_5_7b(cls, **overrides):
        """LLaVA-1.5-7B: CLIP ViT-L/14-336 (layer -2, CLS dropped), 2-layer GELU projector, Vicuna-7B."""
        return cls(vision=VisionConfig.clip_vit_l_336(), lm=LMConfig.llama_7b(), **overrides)

    @classmethod
    def llava_tinyllama_1b(cls, **overrides):
        """LLaVA-1.5's layout at 1.4 B parameters: CLIP ViT-L/14-336 with a TinyLlama-1.1B-shaped LM.

        No public checkpoint has this pairing: it is for random-weight runs at a size between the CPU
        presets and 7B (benchmarks/accelerator_check.py).
        """
        return cls(vision=VisionConfig.clip_vit_l_336(), lm=LMConfig.tinyllama_1_1b(), **overrides)

    @classmethod
    def qwen2_0_5b_siglip(cls, **overrides):
        """SigLIP-base/16-224 (all tokens of layer -2) with Qwen2-0.5B."""
        return cls(vision=VisionConfig.siglip_base_224(), lm=LMConfig.qwen2_0_5b(), **overrides)

    @classmethod
    def smollm2_text(cls, **overrides):
        """Text-only towers over SmolLM2-135M (the offline real-weights LM)."""
        return cls(vision=None, lm=LMConfig.smollm2_135m(), **overrides)


PRESETS = {
    "tiny": MLLMConfig.tiny,
    "base": MLLMConfig.base,
    "llava_1_5_7b": MLLMConfig.llava_1_5_7b,
    "llava_tinyllama_1b": MLLMConfig.llava_tinyllama_1b,
    "qwen2_0_5b_siglip": MLLMConfig.qwen2_0_5b_siglip,
    "smollm2_text": MLLMConfig.smollm2_text,
}
CPU_PRESETS = ("tiny", "base")  # sized by the data; the other presets are real models


def resolve_dtype(name):
    """`"auto"` is bfloat16 on accelerators and float32 on CPU; any other name is returned as is."""
    if name != "auto":
        return name
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def preset_config(preset, *, vocab_size, image_size):
    """The MLLMConfig of `config.model.preset`.

    The CPU presets ("tiny", "base") are sized by the data's vocabulary and image size; presets of real
    models keep their own (the checkpoint's tokenizer must fit in that vocabulary).
    """
    if preset not in PRESETS:
        raise ValueError(f"config.model.preset: unknown {preset!r}; choose from {sorted(PRESETS)}")
    if preset in CPU_PRESETS:
        return PRESETS[preset](vocab_size, image_size)
    return PRESETS[preset]()


def assemble(model_config, lm, vision):
    """The towers' MLLMConfig: `lm` and `vision` (or None) with the `config.model` section's layer layout,
    LoRA, base sharing and dtype."""
    layout = dict(scan_layers=model_config.scan_layers, remat=model_config.remat)
    base_dtype = model_config.get("base_param_dtype", "float32")
    if model_config.full_finetune and base_dtype != "float32":
        raise ValueError(f"config.model.base_param_dtype={base_dtype!r} stores the base for inference only; "
                         "it needs a frozen base (config.model.full_finetune=False)")
    cfg = MLLMConfig(
        vision=None if vision is None else dataclasses.replace(vision, **layout),
        lm=dataclasses.replace(lm, **layout), lora_rank=model_config.lora_rank,
        lora_alpha=model_config.lora_alpha, lora_targets=tuple(model_config.lora_targets),
        share_base=model_config.share_base, base_param_dtype=base_dtype)
    return cfg.with_dtype(resolve_dtype(model_config.dtype))


def config_from(model_config, *, vocab_size, image_size):
    """MLLMConfig from the `config.model` section alone (random base weights); vocab and image size come
    from the prepared data."""
    cfg = preset_config(model_config.preset, vocab_size=vocab_size, image_size=image_size)
    if vocab_size > cfg.lm.vocab_size:
        raise ValueError(f"config.model.preset {model_config.preset!r}: tokenizer vocab {vocab_size} exceeds "
                         f"the model's {cfg.lm.vocab_size}")
    return assemble(model_config, cfg.lm, cfg.vision)


# ------------------------------------------------------------------------------------------ pure math


def pool_tokens(tokens, num_out):
    """Adaptive average pooling of square-grid tokens [B, g*g, D] to [B, num_out, D].

    num_out = mh * mw with mh the largest divisor of num_out not above its square root (a perfect square
    m gives a sqrt(m) x sqrt(m) grid, 1 the global mean). Bins follow torch's adaptive_avg_pool2d:
    output cell i covers rows floor(i*g/mh) .. ceil((i+1)*g/mh) - 1.
    """
    batch, count, dim = tokens.shape
    grid = int(round(count**0.5))
    if grid * grid != count:
        raise ValueError(f"pool_to: {count} tokens do not form a square patch grid "
                         "(pooling needs select_strategy 'default' or a layout without class token)")
    rows = max(d for d in range(1, int(num_out**0.5) + 1) if num_out % d == 0)
    weights_h, weights_w = _adaptive_pool_weights(grid, rows), _adaptive_pool_weights(grid, num_out // rows)
    cells = jnp.einsum("ih,jw,bhwd->bijd", weights_h, weights_w, tokens.reshape(batch, grid, grid, dim))
    return cells.reshape(batch, num_out, dim)


def _adaptive_pool_weights(size, bins):
    starts = [(i * size) // bins for i in range(bins)]
    ends = [-((-(i + 1) * size) // bins) for i in range(bins)]
    index = jnp.arange(size)
    inside = (index >= jnp.array(starts)[:, None]) & (index < jnp.array(ends)[:, None])
    return inside / inside.sum(axis=1, keepdims=True)


def fill_image_slots(embeds, is_image, image_embeds):
    """Puts image_embeds[b, j] at the j-th True of is_image[b] (slots beyond n_slots reuse the last one).

    Args:
      embeds: [B, L, D] token embeddings; is_image: bool [B, L]; image_embeds: [B, n_slots, D].
    """
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(image_embeds, slot[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


# ------------------------------------------------------------------------------------------ modules


class Projector(nnx.Module):
    """LLaVA's multi-modal projector: Linear -> GELU (exact) -> Linear."""

    def __init__(self, vision_size, lm_size, *, dtype, param_dtype, rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # (vis_embed, mlp) then (mlp, embed): never two dimensions on the same mesh axis.
        self.linear_1 = dense(vision_size, lm_size, ("vis_embed", "mlp"), **kw)
        self.linear_2 = dense(lm_size, lm_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class Base(nnx.Module):
    """The frozen part: vision encoder (or None) and LM."""

    def __init__(self, cfg, *, rngs):
        stored = {} if cfg.base_param_dtype is None else {"param_dtype": cfg.base_param_dtype}
        self.vision = None if cfg.vision is None else VisionEncoder(dataclasses.replace(cfg.vision, **stored),
                                                                    rngs=rngs)
        self.lm = LM(dataclasses.replace(cfg.lm, **stored), rngs=rngs)


class Tower(nnx.Module):
    """What one tower owns: its projector (None without vision) and its LoRA set."""

    def __init__(self, cfg, *, rngs):
        dtypes = dict(dtype=jnp.dtype(cfg.lm.dtype), param_dtype=jnp.dtype(cfg.lm.param_dtype))
        self.projector = None if cfg.vision is None else Projector(
            cfg.vision.hidden_size, cfg.lm.hidden_size, rngs=rngs, **dtypes)
        self.lora = make_lora(cfg.lm, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                              rngs=rngs)


class TPADTowers(nnx.Module):
    """Knowledge and Transfer towers over one frozen base (or one base each with share_base=False)."""

    def __init__(self, cfg, *, image_token_id, rngs):
        self.cfg = cfg
        self.image_token_id = image_token_id
        base = Base(cfg, rngs=rngs)
        if cfg.share_base:
            self.bases = nnx.Dict({"shared": base})
        else:
            # The second base starts equal (real weights load the same checkpoint) in buffers of its own.
            copy = nnx.clone(base)
            nnx.update(copy, jax.tree.map(jnp.copy, nnx.state(base)))
            self.bases = nnx.Dict({"knowledge": base, "transfer": copy})
        self.towers = nnx.Dict({name: Tower(cfg, rngs=rngs) for name in TOWERS})

    def base(self, tower=None):
        """The base module `tower` runs on (tower may be None when the base is shared)."""
        if self.cfg.share_base:
            return self.bases["shared"]
        if tower not in TOWERS:
            raise ValueError(f"tower: expected one of {TOWERS} (share_base=False), got {tower!r}")
        return self.bases[tower]

    def encode_images(self, tower, pixels, pool_to=None):
        """Visual tokens [B, T, D_lm]: ViT features -> this tower's projector -> optional pooling to m."""
        base = self.base(tower)
        if base.vision is None:
            raise ValueError("encode_images: this MLLMConfig has vision=None (text-only catalogue)")
        tokens = self.towers[tower].projector(base.vision(pixels))
        return tokens if pool_to is None else pool_tokens(tokens, pool_to)

    def __call__(self, tower, tokens, image_embeds, attention_mask, rows=None):
        """Final hidden states [B, L, D] of `tower` with image_embeds [B, n_slots, D] (or None) in the
        `<image>` positions of tokens [B, L], in order; only at the positions of `rows` (a static
        slice) when given, which spares the last layer the other positions (`LM.__call__`)."""
        lm = self.base(tower).lm
        embeds = lm.embed(tokens)
        if image_embeds is not None:
            embeds = fill_image_slots(embeds, tokens == self.image_token_id, image_embeds)
        return lm(embeds, attention_mask, lora=self.towers[tower].lora, rows=rows)

    def logits(self, hidden, tower=None):
        """float32 next-token logits [..., vocab]."""
        return self.base(tower).lm.logits(hidden)
