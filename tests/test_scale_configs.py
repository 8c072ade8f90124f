"""Scale presets (configs/tpad_llava7b.py, configs/tpad_qwen2_siglip.py) and benchmarks/scale_plan.py."""

import os
import runpy
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tpad_jax.models import llm, tpad
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
scale_plan = runpy.run_path(os.path.join(ROOT, "benchmarks", "scale_plan.py"))
LLAVA_1_5_7B_PARAMETERS = 7_063_427_072  # HF LlavaForConditionalGeneration, llava-hf/llava-1.5-7b-hf


def _config_module(name):
    return runpy.run_path(os.path.join(ROOT, "configs", name))


def _base_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        keys |= _base_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
    return keys


@pytest.mark.parametrize("name, arg, devices, expected", [
    ("tpad_llava7b.py", None, 64, (8, 8, 1)),
    ("tpad_llava7b.py", "h100x8", 8, (1, 8, 1)),
    ("tpad_llava7b.py", "h100x64", 64, (8, 8, 1)),
    ("tpad_llava7b.py", "v5e-64", 64, (4, 16, 1)),
    ("tpad_llava7b.py", "v5e-256", 256, (8, 8, 4)),
    ("tpad_qwen2_siglip.py", None, 8, (8, 1, 1)),
    ("tpad_qwen2_siglip.py", "fsdp", 8, (1, 8, 1)),
])
def test_configs_load_and_resolve_mesh(name, arg, devices, expected):
    config = _config_module(name)["get_config"](arg)
    base = _config_module("tpad_base.py")["get_config"]()
    assert _base_keys(config) == _base_keys(base)  # overrides only: every key is the base config's
    assert mesh_lib.resolve_mesh_shape(config.mesh.shape, devices) == expected
    assert config.mesh.rules == "default"
    assert (config.model.dtype, config.model.remat, config.model.scan_layers) == ("bfloat16", True, True)
    assert (config.model.lora_rank, config.model.lora_alpha, config.model.share_base) == (16, 32.0, True)
    assert not config.model.full_finetune
    for batch in (config.stage1.batch_size, config.stage2.batch_size):
        assert batch % (expected[0] * expected[1]) == 0  # every batch shard gets whole examples


@pytest.mark.parametrize("name", ["tpad_llava7b.py", "tpad_qwen2_siglip.py"])
def test_unknown_mesh_arg_is_refused(name):
    with pytest.raises(ValueError, match="unknown mesh 'tpu-v9'"):
        _config_module(name)["get_config"]("tpu-v9")


def test_llava7b_parameter_counts_match_closed_form():
    config = _config_module("tpad_llava7b.py")["get_config"]()
    tpad_cfg = scale_plan["tpad_config"](config)
    abstract = nnx.eval_shape(lambda: tpad.TPAD(tpad_cfg, rngs=nnx.Rngs(0)))
    counts = scale_plan["parameter_counts"](scale_plan["leaves"](abstract, config.model))

    d, f, layers, rank, e = 4096, 11008, 32, 16, config.model.embed_dim
    projector = 1024 * d + d + d * d + d
    base = counts[("base", "vision")] + counts[("base", "lm")]
    assert base + projector == LLAVA_1_5_7B_PARAMETERS
    lora = layers * rank * (4 * (d + d) + 3 * (d + f))  # q, k, v, o: d -> d; gate, up, down: d <-> f
    vocab = tpad_cfg.mllm.lm.vocab_size
    # knowledge_head, image_view_head, text_view_head: d -> e; word_decoder: e -> vocab
    knowledge_heads = 3 * (d * e + e) + vocab * (e + 1)
    transfer_heads = 2 * (d * d + d + d * e + e)  # trans_head, know_head: d -> d -> e
    critic = 2 * (e * 2 * e + 2 * e + 2 * e * e + e)  # mu and logvar MLPs: e -> 2e -> e
    for tower, heads in (("knowledge", knowledge_heads), ("transfer", transfer_heads)):
        assert counts[(tower, "lora")] == lora
        assert counts[(tower, "projector")] == projector
        assert counts[(tower, "heads")] == heads
    assert counts[("critic", "heads")] == critic
    assert counts[("trainable", "")] == 2 * (lora + projector) + knowledge_heads + transfer_heads + critic
    assert counts[("total", "")] == base + counts[("trainable", "")]


class _MadeUp(nnx.Module):
    """A made-up model laid out like TPAD: a frozen base weight, a LoRA factor, an unnamed head, a table."""

    def __init__(self):
        base_kernel = nnx.Param(jnp.zeros((6, 10), jnp.bfloat16), **rules_lib.param_metadata(("embed", "mlp")))
        lora_a = nnx.LoRAParam(jnp.zeros((8, 4)), **rules_lib.param_metadata(("embed", "lora_rank")))
        self.towers = nnx.Dict({
            "bases": nnx.Dict({"shared": nnx.Dict({"kernel": base_kernel})}),
            "towers": nnx.Dict({"knowledge": nnx.Dict({"lora": nnx.Dict({"a": lora_a})})}),
        })
        self.knowledge_head = nnx.Dict({"bias": nnx.Param(jnp.zeros((3,)))})
        self.tables = nnx.Dict({"tokens": tpad.ItemTable(jnp.zeros((5, 7), jnp.int32))})


def test_state_bytes_per_device_by_hand():
    model_config = types.SimpleNamespace(full_finetune=False, train_projector=True)
    leaves = scale_plan["leaves"](_MadeUp(), model_config)
    mesh_sizes = {"data": 2, "fsdp": 4, "tensor": 3}
    got = scale_plan["state_bytes"](leaves, rules_lib.get_rules("default"), mesh_sizes)
    # base [6, 10] (embed -> fsdp 4, mlp -> tensor 3), bf16: ceil(6/4) * ceil(10/3) = 2 * 4 elements.
    base = 2 * 4 * 2
    # LoRA a [8, 4] (embed -> fsdp 4, lora_rank replicated), trainable: 2 * 4 elements.
    lora = 2 * 4
    head = 3  # no logical axes: replicated
    assert got == dict(params=base + (lora + head) * 4, optimizer=(lora + head) * 8, grads=(lora + head) * 4,
                       tables=5 * 7 * 4)


def test_checkpoint_bytes_by_hand():
    model_config = types.SimpleNamespace(full_finetune=False, train_projector=True)
    got = scale_plan["checkpoint_bytes"](scale_plan["leaves"](_MadeUp(), model_config))
    trainable = 8 * 4 + 3  # LoRA a and the head, float32, each with AdamW's mu and nu (8 B)
    saved = trainable * 4 + trainable * 8
    assert got == {"saved": saved, "whole": saved + 6 * 10 * 2 + 5 * 7 * 4}  # + bf16 base + int32 table


def test_activations_split_over_batch_shards_and_flops_do_not():
    config = _config_module("tpad_base.py")["get_config"]("tiny")
    config.model.remat = True
    config.stage2.batch_size = 8
    config.stage2.keep_batch_size = 4
    tpad_cfg = scale_plan["tpad_config"](config)
    abstract = nnx.eval_shape(lambda: tpad.TPAD(tpad_cfg, rngs=nnx.Rngs(0)))
    leaves = scale_plan["leaves"](abstract, config.model)
    rules = rules_lib.get_rules("default")
    rows = [scale_plan["plan_row"](config, tpad_cfg, leaves, shape) for shape in ((1, 1, 1), (2, 2, 1))]
    # Every pass has a multiple of 4 sequences: 4 batch shards hold a quarter each, nothing replicated.
    one = scale_plan["activation_bytes"](config, tpad_cfg, rules, {"data": 1, "fsdp": 1, "tensor": 1})
    four = scale_plan["activation_bytes"](config, tpad_cfg, rules, {"data": 2, "fsdp": 2, "tensor": 1})
    assert four == pytest.approx(one / 4)
    assert rows[0]["flops"] == rows[1]["flops"] > 0
    assert rows[1]["memory"]["params"] < rows[0]["memory"]["params"]


def test_forward_flops_match_xla_cost_analysis():
    lm_cfg = llm.LMConfig(vocab_size=64, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                          mlp_size=1024)
    model = llm.LM(lm_cfg, rngs=nnx.Rngs(0))
    batch, length = 2, 64
    embeds, mask = jnp.zeros((batch, length, lm_cfg.hidden_size)), jnp.ones((batch, length), bool)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, m: nnx.merge(graphdef, state)(x, m))
    measured = forward.lower(state, embeds, mask).compile().cost_analysis()["flops"]

    model_config = types.SimpleNamespace(full_finetune=False, train_projector=True)
    leaves = scale_plan["leaves"](nnx.Dict({"lm": model}), model_config)
    per_token = 2 * scale_plan["layer_matmul_params"](leaves) + scale_plan["attention_flops_per_token"](
        lm_cfg, length)
    # Norms, RoPE, softmax and SiLU are the rest: a few percent at this width.
    assert measured == pytest.approx(batch * length * per_token, rel=0.1)


def test_7b_preset_stores_its_frozen_base_in_bf16_and_what_trains_in_fp32():
    config = _config_module("tpad_llava7b.py")["get_config"]()
    tpad_cfg = scale_plan["tpad_config"](config)
    abstract = nnx.eval_shape(lambda: tpad.TPAD(tpad_cfg, rngs=nnx.Rngs(0)))
    leaves = [leaf for leaf in scale_plan["leaves"](abstract, config.model) if not leaf.table]
    base = [leaf for leaf in leaves if "towers/bases/" in leaf.path]
    assert base and all(leaf.itemsize == 2 and not leaf.trainable for leaf in base)
    assert all(leaf.itemsize == 4 for leaf in leaves if leaf.trainable)


def test_a_bf16_base_needs_a_frozen_base():
    config = _config_module("tpad_base.py")["get_config"]("tiny")
    config.model.base_param_dtype = "bfloat16"
    with pytest.raises(ValueError, match="base_param_dtype='bfloat16'.*full_finetune=False"):
        scale_plan["tpad_config"](config)


def test_item_table_bytes_per_device_halve_when_the_devices_double():
    config = _config_module("tpad_llava7b.py")["get_config"]()
    tpad_cfg = scale_plan["tpad_config"](config, num_items=4096)
    abstract = nnx.eval_shape(lambda: tpad.TPAD(tpad_cfg, rngs=nnx.Rngs(0)))
    leaves = scale_plan["leaves"](abstract, config.model)
    rules = rules_lib.get_rules("default")
    tables = [scale_plan["state_bytes"](leaves, rules, {"data": data, "fsdp": 8, "tensor": 1})["tables"]
              for data in (1, 2, 4)]
    # 64 pooled CLIP tokens x 1024 x bf16 per item (+ prompts), split over data x fsdp = 8, 16, 32 shards.
    assert tables[0] > 4096 * 64 * 1024 * 2 / 8
    assert tables[1] == tables[0] / 2 and tables[2] == tables[0] / 4
