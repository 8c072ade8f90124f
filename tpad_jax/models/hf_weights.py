"""Hugging Face safetensors checkpoints -> NNX modules, tensor by tensor onto their target shardings.

The loaders read any `Mapping[str, np.ndarray]` keyed by HF names: a `checkpoint.Checkpoint`
(`HFCheckpoint` here, a directory read lazily, or `gguf.GGUFCheckpoint`) or a plain dict. A table of
`Rule`s maps each HF name (a full-match regex) to an NNX state path plus a named `Transform` (torch
stores linear weights as (out, in) and convolutions as (out, in, kh, kw)). `load_module` builds the
target with `nnx.eval_shape`, fills every loadable variable from the mapping, and raises one
`CheckpointMismatchError` listing every missing, unexpected, misshapen or duplicated name.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from tpad_jax.models import checkpoint, llm, mllm, vision

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------- reading
class SafetensorsTensors(Mapping):
    """Lazy `HF name -> np.ndarray` view of `model.safetensors`, a sharded index, or loose shards."""

    def __init__(self, path: str):
        self.path = path
        self._file_of = _files_by_key(path)

    def __getitem__(self, key: str) -> np.ndarray:
        file = self._file_of[key]
        with safe_open(file, framework="numpy") as f:
            if key not in f.keys():
                raise KeyError(f"{file}: tensor {key!r} is listed in {INDEX_FILE} but absent")
            return f.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, read from the header only."""
        with safe_open(self._file_of[key], framework="numpy") as f:
            return tuple(f.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def _files_by_key(path: str) -> dict[str, str]:
    if os.path.isfile(path):
        return _keys_of_files([path])
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: field 'weight_map': missing or not an object")
        return {key: os.path.join(path, file) for key, file in weight_map.items()}
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        return _keys_of_files([os.path.join(path, SINGLE_FILE)])
    shards = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")
    return _keys_of_files(shards)


def _keys_of_files(files: list[str]) -> dict[str, str]:
    file_of = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            for key in f.keys():
                if key in file_of:
                    raise ValueError(f"{file}: tensor {key!r} also stored in {file_of[key]}")
                file_of[key] = file
    return file_of


class HFCheckpoint(checkpoint.Checkpoint):
    """An HF checkpoint directory: `config.json`, its safetensors (indexed on first access, read lazily),
    the path of `tokenizer.json` and the contents of `preprocessor_config.json` (None when absent)."""

    def __init__(self, directory):
        self.path = pathlib.Path(directory)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing (every HF checkpoint directory has one)")
        self.config = json.loads(config_path.read_text())
        tokenizer_path = self.path / "tokenizer.json"
        self.tokenizer_path = tokenizer_path if tokenizer_path.is_file() else None
        preprocessor_path = self.path / "preprocessor_config.json"
        self.preprocessor = json.loads(preprocessor_path.read_text()) if preprocessor_path.is_file() else None

    @functools.cached_property
    def _tensors(self) -> SafetensorsTensors:
        return SafetensorsTensors(str(self.path))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


# ---------------------------------------------------------------------------------- key table
@dataclasses.dataclass(frozen=True)
class Transform:
    """Named torch -> NNX layout change: optional chunk, axis permutation, then an optional reshape.

    `chunk=(i, n)` keeps the i-th of n equal parts of axis 0 (a fused q/k/v `in_proj`). `reshape=True`
    lets the permuted tensor be reshaped row-major to the target shape, which splits a fused
    `heads * head_dim` axis or flattens a patch kernel; without it the shapes must agree exactly.
    """

    name: str
    permute: tuple[int, ...] | None = None
    reshape: bool = False
    chunk: tuple[int, int] | None = None

    def __call__(self, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
        if self.chunk is not None:
            index, parts = self.chunk
            if array.shape[0] % parts:
                raise ValueError(f"axis 0 of {array.shape} does not split in {parts} for {self.name!r}")
            array = np.split(array, parts)[index]
        if self.permute is not None:
            if array.ndim != len(self.permute):
                raise ValueError(f"rank {array.ndim}, transform {self.name!r} needs {len(self.permute)}")
            array = np.transpose(array, self.permute)
        if array.shape != tuple(target_shape) and self.reshape and array.size == math.prod(target_shape):
            array = array.reshape(target_shape)
        if array.shape != tuple(target_shape):
            raise ValueError(f"after {self.name!r}: {array.shape}")
        return array


IDENTITY = Transform("identity")
LINEAR = Transform("linear", permute=(1, 0))  # torch (out, in) -> (in, out)
CONV = Transform("conv", permute=(2, 3, 1, 0), reshape=True)  # (out, in, kh, kw) -> (kh, kw, in, out)


def in_proj_part(index: int, linear: bool) -> Transform:
    """Part `index` (0 q, 1 k, 2 v) of a fused torch `in_proj` weight (linear=True) or bias."""
    return Transform(f"in_proj[{index}]" + ("_linear" if linear else ""),
                     permute=(1, 0) if linear else None, chunk=(index, 3))


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` full-matches an HF name; `target` is its NNX path (`\\1` back-references allowed).

    Every rule whose pattern matches applies, so one HF tensor may fill several targets (a fused
    `in_proj`, or one checkpoint loaded into two towers). A target ending in `@<index>` writes into
    that index of the leading axis (layers stacked on axis 0). `target=None` marks names that are known
    and deliberately dropped.
    """

    pattern: str
    target: str | None
    transform: Transform = IDENTITY


def prefixed(rules: list[Rule], hf_prefix: str, nnx_prefix: str) -> list[Rule]:
    """The same rules for a submodule: `hf_prefix` (a regex) before every pattern, `nnx_prefix.` before
    every target."""
    return [Rule(hf_prefix + rule.pattern,
                 None if rule.target is None else f"{nnx_prefix}.{rule.target}" if nnx_prefix
                 else rule.target, rule.transform) for rule in rules]


def _resolve(rules: list[Rule], key: str) -> list[tuple[Rule, str | None, int | None]]:
    """Every rule matching `key` with its substituted target path (None: dropped) and stack index."""
    resolved = []
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match is None:
            continue
        if rule.target is None:
            resolved.append((rule, None, None))
            continue
        path, _, index = match.expand(rule.target).partition("@")
        resolved.append((rule, path, int(index) if index else None))
    return resolved


# ---------------------------------------------------------------------------------- errors
class CheckpointMismatchError(ValueError):
    """Every disagreement between a checkpoint and its target module, reported together."""

    def __init__(self, source: str, missing=(), unexpected=(), misshapen=(), duplicated=()):
        self.source = source
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.misshapen = sorted(misshapen)
        self.duplicated = sorted(duplicated)
        lines = [f"{source}: checkpoint does not match the model"]
        for title, items in (("missing (NNX paths no tensor filled)", self.missing),
                             ("unexpected (HF names no rule maps)", self.unexpected),
                             ("misshapen", self.misshapen),
                             ("duplicated (several HF names for one NNX slot)", self.duplicated)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items)
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------- loading
def _path_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _build_context():
    """Without a mesh, variables annotated with logical axes cannot shard eagerly: build them plain."""
    if jax.sharding.get_abstract_mesh().empty:
        return nnx.use_eager_sharding(False)
    return contextlib.nullcontext()


def _placement(abstract_state):
    """Per path: the NamedSharding under the current mesh, or None (default device) without one."""
    mesh = jax.sharding.get_mesh()
    flat = nnx.to_flat_state(abstract_state)
    if mesh.empty:
        return {_path_name(path): None for path, _ in flat}
    shardings = nnx.to_flat_state(nnx.get_named_sharding(abstract_state, mesh))
    return {_path_name(path): var.get_value() for path, var in shardings}


def _place(array: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    # each process builds only the shards its devices hold (multi-host safe)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_module(make_module: Callable[[], nnx.Module], tensors: Mapping[str, np.ndarray],
                rules: list[Rule], *, loadable=nnx.Param, source: str = "checkpoint") -> nnx.Module:
    """Builds `make_module()` with every `loadable` variable taken from `tensors` via `rules`.

    Variables outside `loadable` (LoRA, projector, RNG state) keep their fresh initialisation, computed
    in one jit whose dead base-weight initialisers XLA drops. Tensors are cast to the target dtype and
    placed straight on the target sharding (current mesh and logical rules, or the default device).

    Args:
      make_module: builds the module (called under `nnx.eval_shape`, and under `jax.jit` for the rest).
      tensors: HF name -> array; read one target at a time, so a lazy mapping stays lazy.
      rules: the key table; every rule whose pattern fully matches a name applies.
      loadable: nnx filter of the variables the checkpoint must fill exactly.
      source: named in errors (a path, or "gguf:<file>").
    Returns:
      The module with the loaded weights.
    Raises:
      CheckpointMismatchError: listing every missing, unexpected, misshapen and duplicated name.
    """
    with _build_context():
        abstract = nnx.eval_shape(make_module)
    graphdef, loadable_state, rest_state = nnx.split(abstract, loadable, ...)
    targets = {_path_name(path): var.get_value() for path, var in nnx.to_flat_state(loadable_state)}
    shardings = _placement(loadable_state)

    sources = collections.defaultdict(dict)  # target path -> {stack index or None: (HF name, rule)}
    unexpected, misshapen, duplicated = [], [], []
    for key in tensors:
        resolved = _resolve(rules, key)
        if not resolved:
            unexpected.append(key)
        for rule, path, index in resolved:
            if path is None:
                continue
            if path not in targets:
                unexpected.append(f"{key} -> {path} (no such NNX path)")
            elif index in sources[path]:
                slot = path if index is None else f"{path}@{index}"
                duplicated.append(f"{slot}: {' and '.join(sorted((sources[path][index][0], key)))}")
            else:
                sources[path][index] = (key, rule)

    missing, complete = [], []
    for path, target in targets.items():
        slots = sources.get(path, {})
        stacked = None not in slots
        expected_slots = set(range(target.shape[0])) if stacked and target.ndim else {None}
        if slots and set(slots) == expected_slots:
            complete.append((path, stacked))
        else:
            gaps = sorted(expected_slots - set(slots)) if stacked else []
            missing.append(path + (f" (layers {gaps})" if slots and gaps else ""))

    loaded = {}
    for path, stacked in complete:
        target, slots = targets[path], sources[path]
        slot_shape = target.shape[1:] if stacked else target.shape
        pieces = []
        for index in sorted(slots, key=lambda i: -1 if i is None else i):
            key, rule = slots[index]
            array = np.asarray(tensors[key])
            try:
                pieces.append(rule.transform(array, slot_shape).astype(target.dtype))
            except ValueError as error:
                misshapen.append(f"{key} {array.shape} -> {path} {tuple(slot_shape)}: {error}")
        # once anything is wrong, shapes are still checked but nothing more goes to the devices
        if not (missing or unexpected or misshapen or duplicated):
            loaded[path] = _place(np.stack(pieces) if stacked else pieces[0], shardings[path])
    if missing or unexpected or misshapen or duplicated:
        raise CheckpointMismatchError(source, missing, unexpected, misshapen, duplicated)

    _fill(loadable_state, loaded)
    if not nnx.to_flat_state(rest_state):
        return nnx.merge(graphdef, loadable_state)
    return nnx.merge(graphdef, loadable_state, _fresh(make_module, rest_state, loadable))


def _fill(state, loaded: dict[str, jax.Array]) -> None:
    for path, var in nnx.to_flat_state(state):
        var.set_value(loaded[_path_name(path)])


def _fresh(make_module, rest_state, loadable):
    """Concrete values of the non-loadable variables, each on its target sharding."""
    mesh = jax.sharding.get_mesh()
    out_shardings = None if mesh.empty else nnx.get_named_sharding(rest_state, mesh)

    def build():
        with _build_context():
            return nnx.state(make_module(), nnx.Not(loadable))

    return jax.jit(build, out_shardings=out_shardings)()


# ------------------------------------------------------------------------------ model tables
# Transformers-5 LLaVA files prefix the LM with `language_model.model.`; in memory (and in some
# re-saved checkpoints) it is `model.language_model.`. Standalone decoders use `model.`.
LM_BODY_PREFIX = r"(?:model\.|language_model\.model\.|model\.language_model\.)"
LM_HEAD_PREFIX = r"(?:language_model\.)?"


def lm_rules(tie_embeddings: bool) -> list[Rule]:
    """HF Llama / Mistral / Qwen2 names -> `llm.LM` paths (layer parameters stacked on axis 0)."""
    layer = LM_BODY_PREFIX + r"layers\.(\d+)\."
    return [
        Rule(LM_BODY_PREFIX + r"embed_tokens\.weight", "embed.embedding"),
        Rule(layer + r"input_layernorm\.weight", r"layers.input_norm.scale@\1"),
        Rule(layer + r"post_attention_layernorm\.weight", r"layers.post_attention_norm.scale@\1"),
        Rule(layer + r"self_attn\.([qkvo])_proj\.weight", r"layers.attn.\2.kernel@\1", LINEAR),
        Rule(layer + r"self_attn\.([qkv])_proj\.bias", r"layers.attn.\2.bias@\1"),
        Rule(layer + r"mlp\.(gate|up|down)_proj\.weight", r"layers.mlp.\2.kernel@\1", LINEAR),
        Rule(layer + r"self_attn\.rotary_emb\.inv_freq", None),  # a buffer older exports still save
        Rule(LM_BODY_PREFIX + r"norm\.weight", "norm.scale"),
        # a tied checkpoint may still store the head as a copy of the embedding
        Rule(LM_HEAD_PREFIX + r"lm_head\.weight", None if tie_embeddings else "lm_head.kernel", LINEAR),
    ]


def load_lm(source: str | os.PathLike | Mapping[str, np.ndarray], hf_config: dict | None = None, **overrides):
    """An `llm.LM` with the weights of an HF Llama / Mistral / Qwen2 checkpoint (or LLaVA's LM).

    Args:
      source: a checkpoint directory, a `checkpoint.Checkpoint` (e.g. a GGUF file's), or a plain mapping
        `HF name -> np.ndarray`.
      hf_config: the HF config dict; required for a plain mapping, else it replaces the checkpoint's.
      **overrides: `LMConfig` fields that the checkpoint does not fix (dtype, scan_layers, remat).
    Returns:
      The loaded `LM`; its config is `lm.cfg`.
    """
    if isinstance(source, (str, os.PathLike)):
        source = HFCheckpoint(source)
    if isinstance(source, checkpoint.Checkpoint):
        hf_config, name = source.config if hf_config is None else hf_config, str(source.path)
    elif hf_config is None:
        raise ValueError("hf_config is required when the tensors are given as a mapping")
    else:
        name = "tensors"
    cfg = llm.LMConfig.from_hf(hf_config, **overrides)
    return load_module(lambda: llm.LM(cfg, rngs=nnx.Rngs(0)), source, lm_rules(cfg.tie_embeddings),
                       source=name)


# (torch parameter, nnx parameter, transform) of the torch modules the tables map
NORM_LEAVES = (("weight", "scale", IDENTITY), ("bias", "bias", IDENTITY))
LINEAR_LEAVES = (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY))


def _leaf_rules(hf: str, target: str, leaves) -> list[Rule]:
    """One rule per parameter of a torch module; an `@\\1` stack suffix stays at the end of the path."""
    path, _, index = target.partition("@")
    suffix = f"@{index}" if index else ""
    return [Rule(rf"{hf}\.{torch}", f"{path}.{name}{suffix}", transform) for torch, name, transform in leaves]


def vision_rules() -> list[Rule]:
    """HF CLIP / SigLIP vision names (after any `vision_model.` prefix) -> `vision.VisionEncoder` paths."""
    layer = r"encoder\.layers\.(\d+)\."
    rules = [
        Rule(r"embeddings\.patch_embedding\.weight", "patch.kernel", CONV),
        Rule(r"embeddings\.patch_embedding\.bias", "patch.bias"),
        Rule(r"embeddings\.class_embedding", "class_embedding"),
        Rule(r"embeddings\.position_embedding\.weight", "position_embedding"),
        Rule(r"embeddings\.position_ids", None),  # a buffer older exports still save
        *_leaf_rules(r"pre_layrnorm", "pre_norm", NORM_LEAVES),  # sic: HF's spelling
        *_leaf_rules(layer + r"layer_norm1", r"layers.norm1@\1", NORM_LEAVES),
        *_leaf_rules(layer + r"layer_norm2", r"layers.norm2@\1", NORM_LEAVES),
        *(rule for torch, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o"))
          for rule in _leaf_rules(layer + rf"self_attn\.{torch}", rf"layers.attn.{name}@\1", LINEAR_LEAVES)),
        *_leaf_rules(layer + r"mlp\.fc1", r"layers.mlp.fc1@\1", LINEAR_LEAVES),
        *_leaf_rules(layer + r"mlp\.fc2", r"layers.mlp.fc2@\1", LINEAR_LEAVES),
        *_leaf_rules(r"post_layernorm", "post_norm", NORM_LEAVES),
        # SigLIP's attention-pool head; torch's nn.MultiheadAttention fuses q, k, v into in_proj
        Rule(r"head\.probe", "head.probe"),
        *_leaf_rules(r"head\.layernorm", "head.norm", NORM_LEAVES),
        *_leaf_rules(r"head\.attention\.out_proj", "head.attn.o", LINEAR_LEAVES),
        *_leaf_rules(r"head\.mlp\.fc1", "head.mlp.fc1", LINEAR_LEAVES),
        *_leaf_rules(r"head\.mlp\.fc2", "head.mlp.fc2", LINEAR_LEAVES),
    ]
    for index, name in enumerate("qkv"):
        rules += _leaf_rules(r"head\.attention", f"head.attn.{name}", (
            ("in_proj_weight", "kernel", in_proj_part(index, True)),
            ("in_proj_bias", "bias", in_proj_part(index, False))))
    return rules


# HF config classes' defaults for the fields config.json may omit (LLaVA-1.5 omits hidden_act).
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
}
_ACTIVATION_NAMES = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_CLIP_STATS = dict(image_mean=vision._CLIP_MEAN, image_std=vision._CLIP_STD)


def vision_config_from_hf(hf: dict, preprocessor: dict | None = None, **overrides) -> vision.VisionConfig:
    """VisionConfig of an HF CLIP / SigLIP vision config (or a CLIP/SigLIP/LLaVA config holding one).

    Pixel statistics come from `preprocessor_config.json` when given, else the family's defaults.
    """
    hf = hf.get("vision_config", hf)
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(
        hf.get("model_type"), hf.get("model_type", "clip_vision_model"))
    if model_type not in _VISION_DEFAULTS:
        raise ValueError(f"config.json: field 'vision_config.model_type': {model_type!r} is not one of "
                         f"{sorted(_VISION_DEFAULTS)}")
    hf = {**_VISION_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if hf["hidden_act"] not in _ACTIVATION_NAMES:
        raise ValueError(f"config.json: field 'hidden_act': {hf['hidden_act']!r} is not supported")
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"config.json: field 'num_channels': {hf['num_channels']} (only RGB is supported)")
    clip = model_type == "clip_vision_model"
    stats = _CLIP_STATS if clip else {}
    if preprocessor is not None and "image_mean" in preprocessor:
        stats = dict(image_mean=tuple(preprocessor["image_mean"]), image_std=tuple(preprocessor["image_std"]))
    return vision.VisionConfig(**{
        **dict(image_size=hf["image_size"], patch_size=hf["patch_size"], hidden_size=hf["hidden_size"],
               num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
               mlp_size=hf["intermediate_size"], class_token=clip, patch_bias=not clip, pre_norm=clip,
               activation=_ACTIVATION_NAMES[hf["hidden_act"]], layer_norm_eps=hf["layer_norm_eps"],
               use_head=not clip and hf["vision_use_head"], select_strategy="default" if clip else "full"),
        **stats, **overrides})


# Inside LLaVA: `vision_tower.` in files, `model.vision_tower.` in memory, and transformers-4 files
# keep the standalone model's `vision_model.` level.
LLAVA_VISION_PREFIX = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
LLAVA_PROJECTOR_PREFIX = r"(?:model\.)?multi_modal_projector\."
STANDALONE_VISION_PREFIX = r"(?:vision_model\.)?"


def load_vision(source: str, **overrides) -> vision.VisionEncoder:
    """A `VisionEncoder` with the weights of an HF CLIPVisionModel / SiglipVisionModel directory.

    Args:
      source: the checkpoint directory.
      **overrides: VisionConfig fields the checkpoint does not fix (feature_layer, dtype, scan_layers).
    """
    hf = HFCheckpoint(source)
    cfg = vision_config_from_hf(hf.config, hf.preprocessor, **overrides)
    rules = prefixed(vision_rules(), STANDALONE_VISION_PREFIX, "")
    return load_module(lambda: vision.VisionEncoder(cfg, rngs=nnx.Rngs(0)), hf, rules, source=source)


def mllm_config_from_hf(hf: dict, preprocessor: dict | None = None, **overrides) -> mllm.MLLMConfig:
    """MLLMConfig of an HF LLaVA config (vision tower, feature selection, projector, LM).

    Args:
      hf: the LLaVA `config.json` dict.
      preprocessor: `preprocessor_config.json` (pixel statistics), or None.
      **overrides: MLLMConfig fields (lora_rank, lora_alpha, lora_targets, share_base).
    """
    for field, supported in (("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)):
        if hf.get(field, supported) != supported:
            raise ValueError(f"config.json: field {field!r}: {hf[field]!r} (only {supported!r} is supported)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"config.json: field 'vision_feature_layer': {layer!r} (one layer index only)")
    vision_cfg = vision_config_from_hf(hf["vision_config"], preprocessor, feature_layer=layer,
                                       select_strategy=hf.get("vision_feature_select_strategy", "default"))
    return mllm.MLLMConfig(vision=vision_cfg, lm=llm.LMConfig.from_hf(hf["text_config"]), **overrides)


def image_token_id_from_hf(hf: dict) -> int:
    """The `<image>` token id of an HF LLaVA config (`image_token_index`, or v5's `image_token_id`)."""
    for field in ("image_token_index", "image_token_id"):
        if hf.get(field) is not None:
            return int(hf[field])
    raise ValueError("config.json: field 'image_token_index': missing")


def towers_rules(cfg: mllm.MLLMConfig) -> list[Rule]:
    """LLaVA (or, with `cfg.vision=None`, plain LM) names -> every base and projector of `TPADTowers`.

    Each tensor fills all copies: the shared base (or both unshared bases) and both towers' projectors.
    """
    bases = ("shared",) if cfg.share_base else mllm.TOWERS
    rules = []
    for base in bases:
        rules += prefixed(lm_rules(cfg.lm.tie_embeddings), "", f"bases.{base}.lm")
        if cfg.vision is not None:
            rules += prefixed(vision_rules(), LLAVA_VISION_PREFIX, f"bases.{base}.vision")
    if cfg.vision is not None:
        projector = [rule for name in ("linear_1", "linear_2")
                     for rule in _leaf_rules(name, name, LINEAR_LEAVES)]
        for tower in mllm.TOWERS:
            rules += prefixed(projector, LLAVA_PROJECTOR_PREFIX, f"towers.{tower}.projector")
    return rules


def load_towers(cfg: mllm.MLLMConfig, image_token_id: int, tensors: Mapping[str, np.ndarray], *,
                source: str = "tensors") -> mllm.TPADTowers:
    """`TPADTowers` whose bases and projectors come from LLaVA-named (or plain LM) tensors; LoRA fresh."""
    return load_module(lambda: mllm.TPADTowers(cfg, image_token_id=image_token_id, rngs=nnx.Rngs(0)),
                       tensors, towers_rules(cfg), loadable=nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)),
                       source=source)


def load_llava(source: str, **overrides) -> mllm.TPADTowers:
    """`TPADTowers` initialised from an HF LlavaForConditionalGeneration directory.

    Args:
      source: the checkpoint directory (transformers-4 or -5 key names).
      **overrides: MLLMConfig fields (lora_rank, lora_alpha, lora_targets, share_base).
    Returns:
      The towers; `towers.cfg` and `towers.image_token_id` come from the checkpoint.
    """
    hf = HFCheckpoint(source)
    cfg = mllm_config_from_hf(hf.config, hf.preprocessor, **overrides)
    return load_towers(cfg, image_token_id_from_hf(hf.config), hf, source=source)
