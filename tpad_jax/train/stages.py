"""TPAD stages 1 and 2 on the shared loop: what each trains, on which batches, with which loss.

Stage 1 (knowledge acquisition) trains the Knowledge-MLLM on item batches; stage 2 (transition
distillation) trains the Transfer-MLLM on session batches and, through the alignment term, K again.
Both periodically probe the validation split with next-item retrieval by e_K similarity.
"""

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tpad_jax import export, layout, rows
from tpad_jax.data import pipeline
from tpad_jax.eval import metrics as metrics_lib
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.train import loop, optim
from tpad_jax.train.inputs import StageInputs


# The parameter groups stage 2 trains (the base trains too only under model.full_finetune).
STAGE2_GROUPS = (tpad_lib.KNOWLEDGE, tpad_lib.TRANSFER, "critic")
# What `keep_best` selects a stage's state by: the probe's validation MRR@20, the measure downstream
# rows select their epoch by (it counts every rank up to 20, so it is steadier than HR@20).
SELECT_ON = "probe_mrr20"


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


@dataclasses.dataclass
class StageSpec:
    """What one stage trains, on which batches, with which loss: the stage's arguments of `run_loop`.

    Built by `stage1_spec` / `stage2_spec` and consumed by `run_stage1` / `run_stage2` and by
    benchmarks/train_step.py, so that the benchmark times the very step a run compiles.
    """

    dir_name: str  # the stage's directory in the workdir
    desc: str
    loss_fn: loop.LossFn
    tx: optax.GradientTransformation
    wrt: object
    batches: Iterator
    num_steps: int
    seed: int
    init_fn: Callable[[nnx.Module], None]
    keep_best: bool = False  # end with the probed state of best validation MRR@20, step 0 included


def stage1_spec(inputs: StageInputs) -> StageSpec:
    """Knowledge acquisition: K trained on item prompts from a fresh (initialized) model."""
    config = inputs.config
    s1 = config.stage1
    batches = pipeline.item_row_batches(config, inputs.data.num_items, _per_process(s1.batch_size),
                                        shuffle=True, repeat=True, seed=config.seed)

    def loss_fn(model, batch, rng):
        del rng
        return tpad_lib.knowledge_loss(model, batch["rows"], batch["valid"], s1.contrastive_weight,
                                       s1.temperature, s1.reconstruct_weight,
                                       max_targets=config.data.max_item_tokens)

    return StageSpec(
        dir_name=layout.stage_name(rows.STAGE1), desc="stage 1", loss_fn=loss_fn,
        tx=_optimizer(config, {tpad_lib.KNOWLEDGE: s1.learning_rate}, s1.warmup_steps, s1.steps),
        wrt=optim.trainable_filter(
            [tpad_lib.KNOWLEDGE], full_finetune=config.model.full_finetune,
            train_projector=config.model.train_projector), batches=batches, num_steps=s1.steps, seed=config.seed,
        init_fn=inputs.initialize, keep_best=s1.keep_best)


def run_spec(inputs: StageInputs, spec: StageSpec) -> tpad_lib.TPAD:
    """Runs (or restores) the stage `spec` with the validation probe; returns its model."""
    directory = os.path.join(inputs.workdir, spec.dir_name)
    os.makedirs(directory, exist_ok=True)
    result = loop.run_loop(
        workdir=directory, train_config=inputs.config.train,
        mesh=inputs.mesh, rules=inputs.rules, make_model=inputs.make_model, init_fn=spec.init_fn,
        tx=spec.tx, wrt=spec.wrt, loss_fn=spec.loss_fn, data_iterator=spec.batches,
        num_steps=spec.num_steps, seed=spec.seed, eval_fn=probe_eval(inputs), desc=spec.desc,
        constants=tpad_lib.ItemTable, select_on=SELECT_ON if spec.keep_best else None)
    return result.state.model


def run_stage1(inputs: StageInputs) -> tpad_lib.TPAD:
    """Knowledge acquisition: trains K on item prompts; returns the model (restored if already done)."""
    return run_spec(inputs, stage1_spec(inputs))


def stage2_config(config, variant: str):
    """`config` with the stage-2 overrides of `variant` (a stage-2 variant of `rows.EXPORT_VARIANTS`)."""
    known = rows.names(rows.stage2_variants())
    if variant not in known:
        raise ValueError(f"unknown stage-2 variant {variant!r}; choose from {list(known)}")
    changed = ml_collections.ConfigDict(config.to_dict())
    for key, value in rows.export_variant(variant).stage2_overrides.items():
        changed.stage2[key] = value
    return changed


def stage2_spec(inputs: StageInputs, stage1_model: tpad_lib.TPAD | None,
                variant: str = rows.MAIN_VARIANT) -> StageSpec:
    """Transition distillation of `variant`, starting from `stage1_model`.

    `stage1_model=None` starts from a fresh initialized model instead (same shapes and step: what
    benchmarks/train_step.py times without training stage 1 first).
    """
    config = stage2_config(inputs.config, variant)
    s1, s2 = config.stage1, config.stage2
    batches = pipeline.session_batches(config, inputs.data, inputs.tokenizer, "train",
                                       _per_process(s2.batch_size), shuffle=True, repeat=True,
                                       seed=config.seed)
    m = config.data.visual_tokens_per_item
    num_items = inputs.data.num_items
    keep_rows = s2.keep_batch_size
    # Targets per session prompt: the next title and its <eos>.
    title_tokens, item_tokens = config.data.max_title_tokens + 1, config.data.max_item_tokens

    def loss_fn(model, batch, rng):
        if not (s2.keep_weight or s2.negatives):
            return tpad_lib.transition_loss(model, batch, s2, m, max_targets=title_tokens)
        # One K pass over the shown items and the targets, the extra negatives (uniform over the
        # catalogue) and the keep term's items. The keep rows are drawn from `rng` itself, so a run
        # without negatives draws what it always did.
        shown = tpad_lib.shown_and_target(batch)
        row_sets = {"shown": shown.reshape(-1)}
        if s2.negatives:
            row_sets["negatives"] = jax.random.randint(jax.random.fold_in(rng, 1), (s2.negatives,), 0, num_items)
        if s2.keep_weight:
            row_sets["keep"] = jax.random.randint(rng, (keep_rows,), 0, num_items)
        forwards = dict(zip(row_sets, tpad_lib.item_forwards(model, *row_sets.values())))
        negatives = (forwards["negatives"][1], row_sets["negatives"]) if s2.negatives else None
        loss, metrics = tpad_lib.transition_loss(
            model, batch, s2, m, max_targets=title_tokens,
            item_embeddings=forwards["shown"][1].reshape(*shown.shape, -1), negatives=negatives)
        if not s2.keep_weight:
            return loss, metrics
        keep, _ = tpad_lib.knowledge_loss(model, row_sets["keep"], jnp.ones((keep_rows,), bool),
                                          s1.contrastive_weight, s1.temperature, s1.reconstruct_weight,
                                          max_targets=item_tokens, forward=forwards["keep"])
        metrics["keep"] = keep
        return loss + s2.keep_weight * keep, metrics

    if stage1_model is None:
        init_fn = inputs.initialize
    else:
        # A copy: the stage-2 step donates its state, and the stage-1 model is still exported afterwards.
        start_state = jax.tree.map(jnp.copy, nnx.state(stage1_model))
        init_fn = lambda model: nnx.update(model, start_state)  # noqa: E731
    rates = dict(zip(STAGE2_GROUPS, (s2.knowledge_learning_rate, s2.learning_rate, s2.learning_rate)))
    return StageSpec(
        dir_name=layout.stage_name(variant), desc=f"stage 2 ({variant})", loss_fn=loss_fn,
        tx=_optimizer(config, rates, s2.warmup_steps, s2.steps),
        wrt=optim.trainable_filter(STAGE2_GROUPS, full_finetune=config.model.full_finetune,
                                   train_projector=config.model.train_projector),
        batches=batches, num_steps=s2.steps, seed=config.seed + 1, init_fn=init_fn, keep_best=s2.keep_best)


def run_stage2(inputs: StageInputs, stage1_model: tpad_lib.TPAD,
               variant: str = rows.MAIN_VARIANT) -> tpad_lib.TPAD:
    """Transition distillation from the stage-1 model; returns the model (restored if already done)."""
    return run_spec(inputs, stage2_spec(inputs, stage1_model, variant))
