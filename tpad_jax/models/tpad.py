"""TPAD: the two towers plus the heads that turn their hidden states into item and transition features.

Parameter groups (optimizer and trainable filters select them by path):
  towers/...knowledge...   Knowledge-MLLM adapters (LoRA, projector)      group "knowledge"
  knowledge_head, image_view_head                                          group "knowledge"
  towers/...transfer...    Transfer-MLLM adapters                          group "transfer"
  trans_head, know_head                                                    group "transfer"
  club_critic              the variational q(z_know | z_trans) of CLUB     group "critic"
The shared base (ViT + LM) is frozen unless `model.full_finetune`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tpad_jax.models import mi
from tpad_jax.models.mllm import MLLMConfig, TPADTowers

KNOWLEDGE, TRANSFER = "knowledge", "transfer"


@dataclasses.dataclass(frozen=True)
class TPADConfig:
    mllm: MLLMConfig
    embed_dim: int
    image_token_id: int


class TPAD(nnx.Module):
    """Knowledge- and Transfer-MLLM over one base, with the TPAD heads."""

    def __init__(self, cfg: TPADConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.towers = TPADTowers(cfg.mllm, image_token_id=cfg.image_token_id, rngs=rngs)
        width, dim = cfg.mllm.lm.hidden_size, cfg.embed_dim
        self.knowledge_head = nnx.Linear(width, dim, rngs=rngs)
        self.image_view_head = nnx.Linear(width, dim, rngs=rngs)
        self.trans_head = _Head(width, dim, rngs=rngs)
        self.know_head = _Head(width, dim, rngs=rngs)
        self.club_critic = mi.GaussianCritic(dim, dim, hidden=2 * dim, rngs=rngs)


class _Head(nnx.Module):
    """Two-layer head: splitting one state into two factors needs a non-linearity."""

    def __init__(self, width: int, dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, dim, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(x)))


# ------------------------------------------------------------------------------------- features


def visual_tokens(model: TPAD, tower: str, vision_table, rows, pool_to=None):
    """Projected visual tokens of items `rows` ([...]) for `tower`: [..., T, D].

    `vision_table` holds the frozen ViT's patch features per item row ([N, P, Dv]); the projector is
    per tower, so only it runs here.
    """
    feats = vision_table[rows.reshape(-1)]
    tokens = model.towers.project(tower, feats, pool_to=pool_to)
    return tokens.reshape(*rows.shape, *tokens.shape[1:])


def item_forward(model: TPAD, vision_table, items: dict, pool_to=None):
    """K over item prompts. Returns (hidden [B,L,D], e_K [B,d], image_view [B,d])."""
    rows = items["rows"]
    image = visual_tokens(model, KNOWLEDGE, vision_table, rows, pool_to)
    hidden = model.towers(KNOWLEDGE, items["tokens"], image, items["attention_mask"])
    at_item = jnp.take_along_axis(hidden, items["item_pos"][:, None, None], axis=1)[:, 0]
    e_k = model.knowledge_head(at_item)
    image_view = model.image_view_head(jnp.mean(image, axis=1))
    return hidden, e_k, image_view


def token_cross_entropy(model: TPAD, hidden, tokens, loss_mask):
    """Mean next-token cross-entropy over positions whose *next* token is a target."""
    logits = model.towers.logits(hidden[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    mask = loss_mask[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------------------- losses


def knowledge_loss(model: TPAD, vision_table, items: dict, has_image, contrastive_weight, temperature,
                   pool_to=None):
    """Stage-1 loss of K on an item batch: caption generation + image-view/text-view InfoNCE."""
    hidden, e_k, image_view = item_forward(model, vision_table, items, pool_to)
    gen = token_cross_entropy(model, hidden, items["tokens"], items["loss_mask"])
    valid = items["valid"] & has_image[items["rows"]]
    nce, acc = mi.infonce(e_k, image_view, temperature=temperature, mask=valid)
    loss = gen - contrastive_weight * nce
    return loss, {"gen": gen, "view_infonce": nce, "view_acc": acc}


def transition_losses(model: TPAD, vision_table, item_table: dict, session: dict, cfg, m: int,
                      pool_to=None):
    """Stage-2 terms on a session batch. Returns (weighted loss, metrics).

    `item_table` holds the tokenized item prompts of every item (device arrays indexed by row) so that
    e_K of the shown and next items is computed by K in the same step, letting alignment reach K.
    """
    rows, row_mask = session["rows"], session["row_mask"] & session["valid"][:, None]
    # Shown items are left-aligned and each owns m consecutive <image> slots, so slot k is item k // m.
    image = visual_tokens(model, TRANSFER, vision_table, rows, pool_to=m)
    slots = image.reshape(rows.shape[0], -1, image.shape[-1])
    hidden = model.towers(TRANSFER, session["tokens"], slots, session["attention_mask"])
    metrics = {}
    gen = token_cross_entropy(model, hidden, session["tokens"], session["loss_mask"])
    metrics["gen"] = gen

    states = jnp.take_along_axis(hidden, session["sep_pos"][..., None], axis=1)  # [B, S, D]
    z_trans = model.trans_head(states)
    z_know = model.know_head(states)

    both = jnp.concatenate([rows, session["next_rows"][:, -1:]], axis=1)  # shown items + the target
    e_all = _item_embeddings(model, vision_table, item_table, both, pool_to)
    e_cur, e_next = e_all[:, :-1], _next_embeddings(e_all, session)

    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    mask = row_mask.reshape(-1)
    next_ids = session["next_rows"].reshape(-1)
    align, align_acc = mi.infonce(flat(z_trans), flat(e_next), temperature=cfg.temperature, mask=mask,
                                  positive_ids=next_ids)
    metrics.update(align_infonce=align, align_acc=align_acc)
    loss = cfg.gen_weight * gen - cfg.align_weight * align

    if cfg.disentangle != "none":
        know, know_acc = mi.infonce(flat(z_know), flat(e_cur), temperature=cfg.temperature, mask=mask,
                                    positive_ids=rows.reshape(-1))
        if cfg.disentangle == "club":
            separation, critic_nll = _club_terms(model, flat(z_trans), flat(z_know), mask)
            loss = loss + critic_nll  # fits q(z_know | z_trans); touches only the critic's parameters
            metrics["critic_nll"] = critic_nll
        elif cfg.disentangle == "orthogonal":
            separation = _masked_mean(_cosine(flat(z_trans), flat(z_know)) ** 2, mask)
        else:
            raise ValueError(f"stage2.disentangle must be club, orthogonal or none, got {cfg.disentangle!r}")
        loss = loss + cfg.disentangle_weight * (separation - know)
        metrics.update(know_infonce=know, know_acc=know_acc, separation=separation)
    if cfg.mmd_weight:
        discrepancy = mi.mmd(flat(e_next), flat(z_trans), mask_x=mask, mask_y=mask)
        loss = loss + cfg.mmd_weight * discrepancy
        metrics["mmd"] = discrepancy
    return loss, metrics


def _item_embeddings(model, vision_table, item_table, rows, pool_to):
    """e_K of the items `rows` [B, S'] from their stored item prompts: [B, S', d]."""
    flat_rows = rows.reshape(-1)
    items = {key: value[flat_rows] for key, value in item_table.items()}
    items["rows"] = flat_rows
    _, e_k, _ = item_forward(model, vision_table, items, pool_to)
    return e_k.reshape(*rows.shape, -1)


def _next_embeddings(e_all, session):
    """e_K of the item after each shown item: the next shown item, or the target after the last."""
    shown = session["row_mask"].astype(jnp.int32)
    last = jnp.sum(shown, axis=1) - 1  # index of the last shown item; left-aligned rows
    idx = jnp.arange(e_all.shape[1] - 1)[None, :] + 1
    idx = jnp.where(idx > last[:, None], e_all.shape[1] - 1, idx)
    return jnp.take_along_axis(e_all, idx[..., None], axis=1)


def _club_terms(model, z_trans, z_know, mask):
    """(CLUB upper bound with the critic frozen, critic's NLL with the encoders frozen)."""
    graphdef, state = nnx.split(model.club_critic)
    frozen_critic = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    mu, logvar = frozen_critic(z_trans)
    bound = mi.club(mu, logvar, z_know, mask=mask)
    critic_nll = mi.gaussian_nll(*model.club_critic(jax.lax.stop_gradient(z_trans)),
                                 jax.lax.stop_gradient(z_know), mask=mask)
    return bound, critic_nll


def _cosine(a, b):
    a = a / (jnp.linalg.norm(a, axis=-1, keepdims=True) + 1e-6)
    b = b / (jnp.linalg.norm(b, axis=-1, keepdims=True) + 1e-6)
    return jnp.sum(a * b, axis=-1)


def _masked_mean(x, mask):
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
