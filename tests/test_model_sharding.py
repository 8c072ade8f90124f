"""Sharding: logical names on every parameter, rule sets, and a data x fsdp x tensor forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tpad_jax.models.mllm import MLLMConfig, TPADTowers
from tpad_jax.parallel import rules

IMAGE = 3


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 64, size=(4, 12))
    tokens[:, 1:5] = IMAGE
    mask = np.ones((4, 12), bool)
    mask[1, 9:] = False
    pixels = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1.0, maxval=1.0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), pixels


@nnx.jit
def _forward(towers, tokens, mask, pixels):
    feats = towers.encode_images("knowledge", pixels, pool_to=4)
    return towers.logits(towers("knowledge", tokens, feats, mask))


def test_logical_to_spec_never_reuses_a_mesh_axis_and_rule_sets_cover_every_name():
    default = rules.get_rules("default")
    assert rules.logical_to_spec(("batch", "length", "embed"), default) == P(("data", "fsdp"), None, None)
    assert rules.logical_to_spec(("embed", "mlp"), default) == P("fsdp", "tensor")
    assert rules.logical_to_spec(("layers", None, "vocab"), default) == P(None, None, "tensor")
    x = jnp.ones((2, 3))
    assert rules.constrain(x, ("batch", "embed")) is x  # outside a mesh: untouched
    with pytest.raises(ValueError, match="mesh.rules"):
        rules.get_rules("nope")
    abstract = nnx.eval_shape(lambda: TPADTowers(MLLMConfig.tiny(64, share_base=False), image_token_id=IMAGE,
                                                 rngs=nnx.Rngs(0)))
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        used.update(n for n in names if n is not None)
    for name, table in rules.RULE_SETS.items():
        assert used <= {logical for logical, _ in table}, name


def test_sharded_forward_equals_unsharded_and_weights_are_split():
    cfg = MLLMConfig.tiny(64)
    tokens, mask, pixels = _inputs()
    reference = _forward(TPADTowers(cfg, image_token_id=IMAGE, rngs=nnx.Rngs(0)), tokens, mask, pixels)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.get_rules("default")):
        towers = TPADTowers(cfg, image_token_id=IMAGE, rngs=nnx.Rngs(0))
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        sharded = _forward(towers, *(jax.device_put(a, batch) for a in (tokens, mask, pixels)))
    lm = towers.base().lm
    assert lm.layers.mlp.gate.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert lm.layers.attn.k.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
    assert lm.embed.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert towers.towers["knowledge"].lora.down.lora_a[...].sharding.spec == P(None, "tensor")
    assert towers.towers["knowledge"].projector.linear_1.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert len(lm.layers.mlp.gate.kernel[...].addressable_shards[0].data.reshape(-1)) == 2 * 32 * 64 // 4
    diff = float(jnp.abs(sharded - reference).max())
    print(f"max |sharded - unsharded| = {diff:.2e}")
    assert diff < 1e-5
