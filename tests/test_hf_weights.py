"""HF safetensors loading: reading, key tables, transforms, error collection, placement, parity."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from tpad_jax.models import hf_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")


# ------------------------------------------------------------------------------------ reading
def _write_sharded(directory, tensors, files):
    """Saves `tensors` split over `files` shards plus the HF index."""
    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        shard = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::files]}
        save_file(part, os.path.join(directory, shard))
        weight_map.update({k: shard for k in part})
    with open(os.path.join(directory, hf_weights.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _random_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {f"model.layers.{i}.w": rng.normal(size=(3, i + 2)).astype(np.float32) for i in range(5)}


def test_sharded_index_and_single_file_read_the_same_tensors(tmp_path):
    tensors = _random_tensors()
    save_file(tensors, str(tmp_path / "single.safetensors"))
    _write_sharded(str(tmp_path / "sharded"), tensors, files=3)
    single = hf_weights.SafetensorsTensors(str(tmp_path / "single.safetensors"))
    sharded = hf_weights.SafetensorsTensors(str(tmp_path / "sharded"))
    assert sorted(single) == sorted(sharded) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(sharded[key], value)
        np.testing.assert_array_equal(single[key], value)
        assert sharded.shape(key) == value.shape


def test_loose_shards_without_index_are_read_and_empty_directory_is_named(tmp_path):
    tensors = _random_tensors()
    _write_sharded(str(tmp_path), tensors, files=2)
    os.remove(tmp_path / hf_weights.INDEX_FILE)
    assert sorted(hf_weights.SafetensorsTensors(str(tmp_path))) == sorted(tensors)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        hf_weights.SafetensorsTensors(str(tmp_path / "empty"))


def test_index_entry_absent_from_its_shard_names_file_and_key(tmp_path):
    _write_sharded(str(tmp_path), {"a": np.zeros(2, np.float32)}, files=1)
    index_path = tmp_path / hf_weights.INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = index["weight_map"]["a"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(KeyError, match="ghost"):
        hf_weights.SafetensorsTensors(str(tmp_path))["ghost"]


def test_hf_checkpoint_of_committed_sharded_fixture():
    checkpoint = hf_weights.HFCheckpoint(os.path.join(FIXTURES, "mistral"))
    with open(os.path.join(FIXTURES, "mistral", hf_weights.INDEX_FILE)) as f:
        index = json.load(f)
    assert checkpoint.config["model_type"] == "mistral"
    assert checkpoint.tokenizer_path is None
    assert sorted(checkpoint) == sorted(index["weight_map"])
    assert len({os.path.basename(f) for f in checkpoint._tensors._file_of.values()}) > 1
    total = sum(checkpoint[k].size for k in checkpoint)
    assert total == index["metadata"]["total_parameters"]


def test_hf_checkpoint_without_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_weights.HFCheckpoint(str(tmp_path))


# --------------------------------------------------------------------------------- transforms
def test_linear_transform_matches_torch_linear_and_never_reshapes():
    rng = np.random.default_rng(1)
    torch_weight = rng.normal(size=(12, 5)).astype(np.float32)  # (out, in)
    x = rng.normal(size=(5,)).astype(np.float32)
    np.testing.assert_allclose(x @ hf_weights.LINEAR(torch_weight, (5, 12)), torch_weight @ x, rtol=1e-6)
    with pytest.raises(ValueError, match="after 'linear'"):
        hf_weights.LINEAR(torch_weight, (5, 3, 4))


def test_in_proj_parts_split_a_fused_qkv_like_torch_multihead_attention():
    rng = np.random.default_rng(4)
    weight, bias = rng.normal(size=(9, 3)), rng.normal(size=(9,))
    x = rng.normal(size=(3,))
    fused = weight @ x + bias  # torch: q, k, v = (in_proj_weight @ x + in_proj_bias).chunk(3)
    for index in range(3):
        part = x @ hf_weights.in_proj_part(index, True)(weight, (3, 3))
        part += hf_weights.in_proj_part(index, False)(bias, (3,))
        np.testing.assert_allclose(part, fused[3 * index:3 * index + 3])
    with pytest.raises(ValueError, match="does not split"):
        hf_weights.in_proj_part(0, False)(np.zeros(8), (3,))


def test_conv_transform_matches_brute_force_torch_convolution():
    rng = np.random.default_rng(2)
    out_ch, in_ch, k = 4, 3, 2
    weight = rng.normal(size=(out_ch, in_ch, k, k)).astype(np.float32)
    image = rng.normal(size=(1, 4, 4, in_ch)).astype(np.float32)  # NHWC
    # torch Conv2d with stride = kernel = patch size, computed by hand on NCHW indices
    expected = np.zeros((1, 2, 2, out_ch), np.float32)
    for i in range(2):
        for j in range(2):
            patch = image[0, i * k:(i + 1) * k, j * k:(j + 1) * k, :]  # (kh, kw, in)
            expected[0, i, j] = np.einsum("oikl,kli->o", weight, patch)
    kernel = hf_weights.CONV(weight, (k, k, in_ch, out_ch))
    got = jax.lax.conv_general_dilated(image, kernel, (k, k), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    flat = hf_weights.CONV(weight, (k * k * in_ch, out_ch))  # a patch embedding as one matmul
    np.testing.assert_allclose(image[0, :k, :k, :].reshape(-1) @ flat, expected[0, 0, 0], rtol=1e-5)


# ------------------------------------------------------------------------------- load_module
class _Block(nnx.Module):
    def __init__(self, dim, *, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.up = nnx.Linear(dim, 2 * dim, kernel_init=init, rngs=rngs)
        self.adapter = nnx.LoRAParam(jnp.ones((dim, 2)))


class _Toy(nnx.Module):
    """Two listed blocks, one stacked (scan-style) weight, a norm, and non-loadable state."""

    def __init__(self, dim=4, *, rngs):
        self.blocks = nnx.List([_Block(dim, rngs=rngs) for _ in range(2)])
        self.stacked = nnx.Param(jnp.zeros((3, dim, dim)))
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


_TOY_RULES = [
    hf_weights.Rule(r"model\.blocks\.(\d+)\.up\.weight", r"blocks.\1.up.kernel", hf_weights.LINEAR),
    hf_weights.Rule(r"model\.blocks\.(\d+)\.up\.bias", r"blocks.\1.up.bias"),
    hf_weights.Rule(r"model\.layers\.(\d+)\.w", r"stacked@\1", hf_weights.LINEAR),
    hf_weights.Rule(r"model\.norm\.weight", "norm.scale"),
    hf_weights.Rule(r".*rotary_emb\.inv_freq", None),
]
_TOY_LOADABLE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _toy_tensors(dim=4, seed=3):
    rng = np.random.default_rng(seed)
    tensors = {"model.norm.weight": rng.normal(size=(dim,)), "model.rotary_emb.inv_freq": np.ones(2)}
    for i in range(2):
        tensors[f"model.blocks.{i}.up.weight"] = rng.normal(size=(2 * dim, dim))
        tensors[f"model.blocks.{i}.up.bias"] = rng.normal(size=(2 * dim,))
    for i in range(3):
        tensors[f"model.layers.{i}.w"] = rng.normal(size=(dim, dim))
    return tensors


def _load_toy(tensors):
    return hf_weights.load_module(lambda: _Toy(rngs=nnx.Rngs(0)), tensors, _TOY_RULES,
                                  loadable=_TOY_LOADABLE, source="toy")


def test_load_module_fills_listed_and_stacked_weights_and_keeps_the_rest():
    tensors = _toy_tensors()
    toy = _load_toy(tensors)
    for i in range(2):
        np.testing.assert_allclose(toy.blocks[i].up.kernel[...], tensors[f"model.blocks.{i}.up.weight"].T)
        np.testing.assert_allclose(toy.blocks[i].up.bias[...], tensors[f"model.blocks.{i}.up.bias"])
        np.testing.assert_array_equal(toy.blocks[i].adapter[...], np.ones((4, 2)))  # fresh init kept
    for i in range(3):
        np.testing.assert_allclose(toy.stacked[...][i], tensors[f"model.layers.{i}.w"].T)
    np.testing.assert_allclose(toy.norm.scale[...], tensors["model.norm.weight"])
    assert toy.norm.scale[...].dtype == jnp.float32  # float64 input cast to the target dtype
    assert toy.dropout.rngs is not None and toy.dropout.rngs.key[...].shape == ()


def test_load_module_places_weights_on_the_mesh_shardings():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    tensors = _toy_tensors()
    with jax.set_mesh(mesh), nnx.logical_axis_rules((("embed", "data"), ("mlp", "tensor"))):
        toy = _load_toy(tensors)
    kernel = toy.blocks[1].up.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", "tensor")
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (1, 4)
    np.testing.assert_allclose(kernel, tensors["model.blocks.1.up.weight"].T)
    assert toy.blocks[0].adapter[...].sharding.mesh.shape == mesh.shape


def test_every_mismatch_is_reported_in_one_error():
    tensors = _toy_tensors()
    del tensors["model.blocks.0.up.weight"]  # missing
    del tensors["model.layers.2.w"]  # a gap in a stacked target
    tensors["model.blocks.1.up.bias"] = np.zeros(3)  # misshapen
    tensors["vision_tower.extra.weight"] = np.zeros(2)  # unexpected
    tensors["model.blocks.9.up.bias"] = np.zeros(8)  # matches a rule, but no such NNX path
    with pytest.raises(hf_weights.CheckpointMismatchError) as caught:
        _load_toy(tensors)
    error = caught.value
    assert error.missing == ["blocks.0.up.kernel", "stacked (layers [2])"]
    assert error.unexpected == ["model.blocks.9.up.bias -> blocks.9.up.bias (no such NNX path)",
                                "vision_tower.extra.weight"]
    assert len(error.misshapen) == 1 and error.misshapen[0].startswith("model.blocks.1.up.bias (3,)")
    message = str(error)
    assert message.startswith("toy:") and all(
        name in message for name in ("blocks.0.up.kernel", "vision_tower.extra.weight", "(3,)"))


def test_two_hf_names_for_one_slot_are_reported_as_duplicates():
    tensors = _toy_tensors()
    rules = _TOY_RULES + [hf_weights.Rule(r"alias\.norm", "norm.scale")]
    tensors["alias.norm"] = tensors["model.norm.weight"]
    with pytest.raises(hf_weights.CheckpointMismatchError) as caught:
        hf_weights.load_module(lambda: _Toy(rngs=nnx.Rngs(0)), tensors, rules, loadable=_TOY_LOADABLE)
    assert caught.value.duplicated == ["norm.scale: alias.norm and model.norm.weight"]


# ------------------------------------------------------------------------------ PyTorch parity
def _reference(name):
    return np.load(os.path.join(FIXTURES, name, "reference.npz"))


def _max_abs_diff(got, want, where=None):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return float(diff[where].max() if where is not None else diff.max())


@nnx.jit  # one compilation is much faster than op-by-op dispatch on a 2-core CPU
def _lm_logits(lm, tokens, attention_mask):
    return lm.logits(lm(lm.embed(tokens), attention_mask))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_causal_lm_logits_match_pytorch(name):
    ref = _reference(name)
    lm = hf_weights.load_lm(os.path.join(FIXTURES, name))
    logits = _lm_logits(lm, jnp.asarray(ref["tokens"]), jnp.asarray(ref["attention_mask"]))
    diff = _max_abs_diff(logits, ref["logits"], ref["attention_mask"])  # padded queries are unused
    print(f"{name}: max |logits - torch| = {diff:.2e} ({ref['attn_implementation']} attention)")
    assert diff < 1e-4


def test_lm_loads_from_an_in_memory_mapping_with_its_config():
    directory = os.path.join(FIXTURES, "qwen2")
    checkpoint = hf_weights.HFCheckpoint(directory)
    tensors = dict(checkpoint)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a tied copy is ignored
    lm = hf_weights.load_lm(tensors, checkpoint.config)
    assert lm.lm_head is None
    np.testing.assert_array_equal(lm.layers.attn.k.bias[...][1],
                                  tensors["model.layers.1.self_attn.k_proj.bias"])
    ref = _reference("qwen2")
    logits = _lm_logits(lm, jnp.asarray(ref["tokens"]), jnp.asarray(ref["attention_mask"]))
    assert _max_abs_diff(logits, ref["logits"], ref["attention_mask"]) < 1e-4
    with pytest.raises(ValueError, match="hf_config"):
        hf_weights.load_lm(tensors)


def test_corrupted_lm_mapping_reports_missing_unexpected_and_misshapen_together():
    checkpoint = hf_weights.HFCheckpoint(os.path.join(FIXTURES, "llama"))
    tensors = dict(checkpoint)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 63), np.float32)
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(hf_weights.CheckpointMismatchError) as caught:
        hf_weights.load_lm(tensors, checkpoint.config)
    error = caught.value
    assert error.missing == ["layers.mlp.up.kernel (layers [1])"]
    assert error.unexpected == ["model.layers.0.self_attn.qkv_proj.weight"]
    assert [m.split(" ")[0] for m in error.misshapen] == ["model.layers.0.self_attn.q_proj.weight"]
    assert "(64, 63)" in str(error) and "up.kernel" in str(error) and "qkv_proj" in str(error)


def _jax_pixels(torch_pixels, cfg):
    """The [-1, 1] pixels that `VisionEncoder` re-normalises to exactly what torch was fed."""
    mean, std = np.asarray(cfg.image_mean, np.float64), np.asarray(cfg.image_std, np.float64)
    return jnp.asarray(2.0 * (torch_pixels * std + mean) - 1.0, jnp.float32)


@nnx.jit
def _vision_outputs(encoder, pixels):
    """HF `hidden_states` (every depth), `pooler_output` and `last_hidden_state`."""
    hidden = [encoder.hidden_state(pixels, depth) for depth in range(encoder.cfg.num_layers + 1)]
    # SigLIP's last_hidden_state is post-normed; CLIP's is not
    last = encoder.post_norm(hidden[-1]) if encoder.cfg.use_head else hidden[-1]
    return hidden, encoder.pooled(pixels), last


@pytest.mark.parametrize("name", ["clip_vision", "siglip_vision"])
def test_vision_hidden_states_and_pooled_output_match_pytorch(name):
    ref = _reference(name)
    encoder = hf_weights.load_vision(os.path.join(FIXTURES, name))
    pixels = _jax_pixels(ref["pixel_values"], encoder.cfg)
    hidden, pooled, last = _vision_outputs(encoder, pixels)
    diffs = [_max_abs_diff(h, want) for h, want in zip(hidden, ref["hidden_states"], strict=True)]
    pooled = _max_abs_diff(pooled, ref["pooler_output"])
    last_diff = _max_abs_diff(last, ref["last_hidden_state"])
    print(f"{name}: max |hidden_states[i] - torch| = {[f'{d:.1e}' for d in diffs]}, "
          f"last_hidden_state {last_diff:.1e}, pooled {pooled:.1e}")
    assert max(diffs + [pooled, last_diff]) < 1e-4


def _llava_logits(towers, ref, tower="knowledge"):
    pixels = _jax_pixels(ref["pixel_values"], towers.cfg.vision)
    return _llava_forward(towers, pixels, jnp.asarray(ref["tokens"]), jnp.asarray(ref["attention_mask"]),
                          tower)


@nnx.jit(static_argnums=4)
def _llava_forward(towers, pixels, tokens, attention_mask, tower):
    features = towers.encode_images(tower, pixels)
    return features, towers.logits(towers(tower, tokens, features, attention_mask), tower)


def test_llava_image_features_and_logits_match_pytorch():
    ref = _reference("llava")
    towers = hf_weights.load_llava(os.path.join(FIXTURES, "llava"))
    assert towers.image_token_id == 255 and towers.cfg.vision.feature_layer == -2
    features, logits = _llava_logits(towers, ref)
    feature_diff = _max_abs_diff(features, ref["image_features"])
    logit_diff = _max_abs_diff(logits, ref["logits"])
    print(f"llava: max |image features - torch| = {feature_diff:.2e}, "
          f"max |logits - torch| = {logit_diff:.2e}")
    assert feature_diff < 1e-4 and logit_diff < 1e-4
    np.testing.assert_array_equal(towers.towers["transfer"].projector.linear_2.kernel[...],
                                  towers.towers["knowledge"].projector.linear_2.kernel[...])


def _in_memory_llava_name(key):
    """transformers-5 in-memory names: `model.language_model.*`, `lm_head`, `model.vision_tower.*`."""
    for file_prefix, memory_prefix in (("language_model.model.", "model.language_model."),
                                       ("language_model.lm_head.", "lm_head."),
                                       ("vision_tower.", "model.vision_tower."),
                                       ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(file_prefix):
            return memory_prefix + key[len(file_prefix):]
    raise AssertionError(f"unmapped fixture key {key}")


def test_llava_in_memory_names_and_unshared_bases_load_the_same_weights():
    directory = os.path.join(FIXTURES, "llava")
    checkpoint = hf_weights.HFCheckpoint(directory)
    renamed = {_in_memory_llava_name(k): checkpoint[k] for k in checkpoint}
    cfg = hf_weights.mllm_config_from_hf(checkpoint.config, share_base=False)
    towers = hf_weights.load_towers(cfg, hf_weights.image_token_id_from_hf(checkpoint.config), renamed)
    ref = _reference("llava")
    assert _max_abs_diff(_llava_logits(towers, ref, "transfer")[1], ref["logits"]) < 1e-4
    knowledge, transfer = (nnx.to_flat_state(nnx.state(towers.bases[name]))
                           for name in ("knowledge", "transfer"))
    for (path, first), (_, second) in zip(knowledge, transfer, strict=True):
        np.testing.assert_array_equal(first[...], second[...], err_msg=str(path))
    both_forms = {**renamed, **checkpoint}
    with pytest.raises(hf_weights.CheckpointMismatchError) as caught:
        hf_weights.load_towers(cfg, 255, both_forms)
    assert len(caught.value.duplicated) == 2 * len(renamed)  # every name fills two slots
