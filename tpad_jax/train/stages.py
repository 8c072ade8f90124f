"""TPAD stages 1 and 2 on the shared loop: what each trains, on which batches, with which loss.

Stage 1 (knowledge acquisition) trains the Knowledge-MLLM on item batches; stage 2 (transition
distillation) trains the Transfer-MLLM on session batches and, through the alignment term, K again.
Both periodically probe the validation split with next-item retrieval by e_K similarity.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tpad_jax import export
from tpad_jax.data import pipeline
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.train import loop, optim
from tpad_jax.train.inputs import StageInputs, stage_dir

# Stage-2 variants: the main run and the paper's ablations, each one flag away from it.
STAGE2_VARIANTS = {
    "tpad": {},
    "no-gen": {"gen_weight": 0.0},
    "no-disentangle": {"disentangle": "none"},
    "no-align": {"align_weight": 0.0},
}


def _trainable(config, group_names):
    """The parameters of `group_names`; base weights only under full fine-tuning."""
    patterns = [tpad_lib.GROUP_PATTERNS[name] for name in group_names]
    if config.model.full_finetune:
        patterns.append(tpad_lib.GROUP_PATTERNS["base"])
    selected = nnx.All(nnx.Param, optim.path_matches("|".join(patterns)))
    if not config.model.full_finetune:
        selected = nnx.All(selected, nnx.Not(optim.path_matches("towers/bases/")))
    if not config.model.train_projector:
        selected = nnx.All(selected, nnx.Not(nnx.PathContains("projector")))
    return selected


def _optimizer(config, rates: dict, warmup: int, steps: int):
    groups = {name: optim.GroupSchedule(tpad_lib.GROUP_PATTERNS[name], rate, warmup, steps)
              for name, rate in rates.items()}
    if config.model.full_finetune:
        groups["base"] = optim.GroupSchedule(tpad_lib.GROUP_PATTERNS["base"], min(rates.values()), warmup,
                                             steps)
    return optim.make_optimizer(groups, config.train.grad_clip, config.train.weight_decay)


def _per_process(batch_size: int) -> int:
    if batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} is not divisible by {jax.process_count()} processes")
    return batch_size // jax.process_count()


def probe_eval(inputs: StageInputs):
    """eval_fn: HR@20 / MRR@20 of next-item retrieval by e_K similarity on the validation split."""

    def eval_fn(model, step):
        del step
        embeddings = export.item_embeddings(model, inputs.config.eval.batch_size)
        ranks = export.retrieval_ranks(embeddings, inputs.data, "valid", inputs.config.eval.batch_size)
        result = metrics_lib.metrics_from_ranks(ranks, (20,))
        return {"probe_hr20": result[("HR", 20)], "probe_mrr20": result[("MRR", 20)]}

    return eval_fn


def run_stage1(inputs: StageInputs) -> tpad_lib.TPAD:
    """Knowledge acquisition: trains K on item prompts; returns the model (restored if already done)."""
    config = inputs.config
    s1 = config.stage1
    batches = pipeline.item_row_batches(config, inputs.data.num_items, _per_process(s1.batch_size),
                                        shuffle=True, repeat=True, seed=config.seed)

    def loss_fn(model, batch, rng):
        del rng
        return tpad_lib.knowledge_loss(model, batch["rows"], batch["valid"], s1.contrastive_weight,
                                       s1.temperature, s1.reconstruct_weight)

    result = loop.run_loop(
        workdir=stage_dir(inputs.workdir, "stage1"), train_config=config.train, mesh=inputs.mesh,
        rules=inputs.rules, make_model=inputs.make_model, init_fn=inputs.initialize,
        tx=_optimizer(config, {tpad_lib.KNOWLEDGE: s1.learning_rate}, s1.warmup_steps, s1.steps),
        wrt=_trainable(config, [tpad_lib.KNOWLEDGE]), loss_fn=loss_fn, data_iterator=batches,
        num_steps=s1.steps, seed=config.seed, eval_fn=probe_eval(inputs), desc="stage 1")
    return result.state.model


def stage2_config(config, variant: str):
    """`config` with the stage-2 overrides of `variant` (a key of STAGE2_VARIANTS)."""
    if variant not in STAGE2_VARIANTS:
        raise ValueError(f"unknown stage-2 variant {variant!r}; choose from {list(STAGE2_VARIANTS)}")
    changed = ml_collections.ConfigDict(config.to_dict())
    for key, value in STAGE2_VARIANTS[variant].items():
        changed.stage2[key] = value
    return changed


def stage2_dir_name(variant: str) -> str:
    return "stage2" if variant == "tpad" else f"stage2_{variant}"


def run_stage2(inputs: StageInputs, stage1_model: tpad_lib.TPAD, variant: str = "tpad") -> tpad_lib.TPAD:
    """Transition distillation from the stage-1 model; returns the model (restored if already done)."""
    config = stage2_config(inputs.config, variant)
    s1, s2 = config.stage1, config.stage2
    batches = pipeline.session_batches(config, inputs.data, inputs.tokenizer, "train",
                                       _per_process(s2.batch_size), shuffle=True, repeat=True,
                                       seed=config.seed)
    m = config.data.visual_tokens_per_item
    num_items = inputs.data.num_items
    keep_rows = s2.keep_batch_size

    def loss_fn(model, batch, rng):
        loss, metrics = tpad_lib.transition_loss(model, batch, s2, m)
        if s2.keep_weight:
            rows = jax.random.randint(rng, (keep_rows,), 0, num_items)
            keep, _ = tpad_lib.knowledge_loss(model, rows, jnp.ones((keep_rows,), bool),
                                              s1.contrastive_weight, s1.temperature, s1.reconstruct_weight)
            loss = loss + s2.keep_weight * keep
            metrics["keep"] = keep
        return loss, metrics

    # A copy: the stage-2 step donates its state, and the stage-1 model is still exported afterwards.
    start_state = jax.tree.map(jnp.copy, nnx.state(stage1_model))
    rates = {tpad_lib.KNOWLEDGE: s2.knowledge_learning_rate, tpad_lib.TRANSFER: s2.learning_rate,
             "critic": s2.learning_rate}
    result = loop.run_loop(
        workdir=stage_dir(inputs.workdir, stage2_dir_name(variant)), train_config=config.train,
        mesh=inputs.mesh, rules=inputs.rules, make_model=inputs.make_model,
        init_fn=lambda model: nnx.update(model, start_state),
        tx=_optimizer(config, rates, s2.warmup_steps, s2.steps),
        wrt=_trainable(config, list(rates)), loss_fn=loss_fn, data_iterator=batches, num_steps=s2.steps,
        seed=config.seed + 1, eval_fn=probe_eval(inputs), desc=f"stage 2 ({variant})")
    return result.state.model
