"""Optimizers: the trainable filter (which TPAD parameters each stage updates, under each config flag) and
the learning-rate schedules."""

import numpy as np
import pytest
from flax import nnx

from tpad_jax.models import mllm, tpad
from tpad_jax.train import optim


def _paths(group_names, share_base=True, **flags):
    cfg = tpad.TPADConfig(mllm=mllm.MLLMConfig.tiny(64, lora_targets=("q",), share_base=share_base),
                          embed_dim=8, image_token_id=3, num_items=5, item_prompt_length=6,
                          item_visual_tokens=2)
    model = nnx.eval_shape(lambda: tpad.TPAD(cfg, rngs=nnx.Rngs(0)))
    flags = dict(full_finetune=False, train_projector=True) | flags
    state = nnx.state(model, optim.trainable_filter(group_names, **flags))
    return {optim.path_string(path) for path, _ in nnx.to_flat_state(state)}


def _base(model_paths, name):
    return {path for path in model_paths if path.startswith(f"towers/bases/{name}/")}


def _tower(name, projector=True):
    leaves = {f"towers/towers/{name}/lora/q/lora_a", f"towers/towers/{name}/lora/q/lora_b"}
    if projector:
        leaves |= {f"towers/towers/{name}/projector/{layer}/{leaf}"
                   for layer in ("linear_1", "linear_2") for leaf in ("kernel", "bias")}
    return leaves


def _linear(*names):
    return {f"{name}/{leaf}" for name in names for leaf in ("kernel", "bias")}


KNOWLEDGE_HEADS = _linear("knowledge_head", "image_view_head", "text_view_head", "word_decoder")
TRANSFER_HEADS = _linear("trans_head/hidden", "trans_head/out", "know_head/hidden", "know_head/out")
CRITIC = _linear("club_critic/mu_hidden", "club_critic/mu_out", "club_critic/logvar_hidden",
                 "club_critic/logvar_out")


def test_stage1_trains_the_knowledge_tower_and_its_heads_only():
    assert _paths(["knowledge"]) == _tower("knowledge") | KNOWLEDGE_HEADS


def test_without_train_projector_the_towers_train_lora_and_heads():
    assert _paths(["knowledge", "transfer", "critic"], train_projector=False) == (
        _tower("knowledge", projector=False) | _tower("transfer", projector=False) | KNOWLEDGE_HEADS
        | TRANSFER_HEADS | CRITIC)


@pytest.mark.parametrize("share_base", [True, False])
def test_bases_train_only_under_full_finetune(share_base):
    everything = _paths(["knowledge", "transfer", "critic", "base"], share_base=share_base,
                        full_finetune=True)
    # A tower's own base (share_base=False) matches its group's pattern, yet stays frozen.
    assert _paths(["knowledge"], share_base=share_base) == _tower("knowledge") | KNOWLEDGE_HEADS
    base = _base(everything, "shared" if share_base else "knowledge")
    assert base and all("/lm/" in path or "/vision/" in path for path in base)
    assert _paths(["knowledge"], share_base=share_base, full_finetune=True) == (
        _tower("knowledge") | KNOWLEDGE_HEADS | base)


def test_group_schedules_decay_on_a_cosine_or_hold_the_peak():
    cosine = optim.GroupSchedule(".*", peak_lr=0.2, warmup_steps=0, total_steps=100).schedule()
    constant = optim.GroupSchedule(".*", 0.2, 0, 100, decay="constant").schedule()
    warm_constant = optim.GroupSchedule(".*", 0.2, 10, 100, decay="constant").schedule()
    for step in (0, 25, 50, 99):  # 0.1 (1 + cos(pi t / T)), and the peak throughout
        np.testing.assert_allclose(cosine(step), 0.1 * (1 + np.cos(np.pi * step / 100)), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(constant(step), 0.2, rtol=1e-6)
    np.testing.assert_allclose([warm_constant(s) for s in (0, 5, 10, 1000)], [0.0, 0.1, 0.2, 0.2], rtol=1e-6)
    with pytest.raises(ValueError, match="decay must be one of"):
        optim.GroupSchedule(".*", 0.2, 0, 100, decay="step")
