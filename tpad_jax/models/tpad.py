"""TPAD: the two towers, the heads that read item and transition features off them, and the losses.

Parameter paths (optimizer groups and trainable filters select them by regex):
  towers/bases/shared/...                the frozen shared base (ViT + LM)    group "base"
  towers/bases/{knowledge,transfer}/...  each tower's own base (share_base=False), in its tower's group
  towers/towers/knowledge/...            Knowledge-MLLM projector + LoRA     group "knowledge"
  knowledge_head, image_view_head, text_view_head, word_decoder             group "knowledge"
  prior_head                             the knowledge prior's map into e_K  group "knowledge"
  towers/towers/transfer/...             Transfer-MLLM projector + LoRA      group "transfer"
  trans_head, know_head                                                     group "transfer"
  club_critic                            q(z_know | z_trans) of CLUB          group "critic"
  tables/...                             per-item constants (ItemTable): never trained
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tpad_jax.models import mi
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.models.mllm import MLLMConfig, TPADTowers, pool_tokens

KNOWLEDGE, TRANSFER = "knowledge", "transfer"
GROUP_PATTERNS = {
    KNOWLEDGE: (r"towers/(towers|bases)/knowledge/|knowledge_head/|image_view_head/|text_view_head/"
                r"|word_decoder/|prior_head/"),
    TRANSFER: r"towers/(towers|bases)/transfer/|trans_head/|know_head/",
    "critic": r"club_critic/",
    "base": r"towers/bases/shared/",
}
ITEM_PROMPT_FIELDS = ("tokens", "attention_mask", "loss_mask", "item_pos")


class ItemTable(nnx.Variable):
    """Per-item constants (frozen ViT features, tokenized item prompts): model state, never trained.

    Rows are split over the mesh by the logical axis `items` (`TABLE_AXIS`); a table has
    `TPADConfig.rows` rows, the catalogue's padded to a multiple of that split.
    """


TABLE_AXIS = "items"


def _table(value):
    return ItemTable(value, **rules_lib.param_metadata((TABLE_AXIS,) + (None,) * (value.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class TPADConfig:
    mllm: MLLMConfig
    embed_dim: int
    image_token_id: int
    num_items: int
    item_prompt_length: int
    item_visual_tokens: int  # visual tokens per item in item prompts (0 for text-only catalogues)
    # Rows of the item tables: num_items rounded up to a multiple of the mesh shards of `items` (0: as
    # many as items). Rows past num_items are padding that no batch indexes.
    table_rows: int = 0
    # Width of the knowledge prior, a frozen pretrained embedding per item that K adds to e_K through
    # `prior_head` (`model.knowledge_prior`; 0: none).
    prior_dim: int = 0

    @property
    def rows(self) -> int:
        return self.table_rows or self.num_items


class TPAD(nnx.Module):
    """Knowledge- and Transfer-MLLM over one base, the TPAD heads, and the per-item tables."""

    def __init__(self, cfg: TPADConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.towers = TPADTowers(cfg.mllm, image_token_id=cfg.image_token_id, rngs=rngs)
        width, dim = cfg.mllm.lm.hidden_size, cfg.embed_dim
        if cfg.prior_dim:
            # K starts from its knowledge prior and learns what to add: e_K = prior map + a head over K's
            # state that starts at zero, and the map starts as the identity when the widths agree (e_K
            # is then the prior itself until training moves it) or a random projection when they do not.
            self.knowledge_head = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros, rngs=rngs)
            self.prior_head = nnx.Linear(cfg.prior_dim, dim, rngs=rngs, **(
                {"kernel_init": _identity} if cfg.prior_dim == dim else {}))
        else:
            self.knowledge_head = nnx.Linear(width, dim, rngs=rngs)
        self.image_view_head = nnx.Linear(width, dim, rngs=rngs)
        self.text_view_head = nnx.Linear(width, dim, rngs=rngs)
        self.word_decoder = nnx.Linear(dim, cfg.mllm.lm.vocab_size, rngs=rngs)
        self.trans_head = _Head(width, dim, rngs=rngs)
        self.know_head = _Head(width, dim, rngs=rngs)
        self.club_critic = mi.GaussianCritic(dim, dim, 2 * dim, rngs=rngs)
        # Filled by `StageInputs.initialize`; zeros here so that an abstract model has the right shapes.
        n, length = cfg.rows, cfg.item_prompt_length
        self.tables = nnx.Dict({
            "tokens": _table(jnp.zeros((n, length), jnp.int32)),
            "attention_mask": _table(jnp.zeros((n, length), bool)),
            "loss_mask": _table(jnp.zeros((n, length), bool)),
            "item_pos": _table(jnp.zeros((n,), jnp.int32)),
            "has_image": _table(jnp.zeros((n,), bool)),
        })
        if cfg.prior_dim:
            self.tables["prior"] = _table(jnp.zeros((n, cfg.prior_dim), jnp.float32))
        if cfg.item_visual_tokens:
            vision_dim = cfg.mllm.vision.hidden_size
            self.tables["vision"] = _table(jnp.zeros((n, cfg.item_visual_tokens, vision_dim),
                                                     jnp.dtype(cfg.mllm.lm.dtype)))


def _identity(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(*shape, dtype=dtype)


class _Head(nnx.Module):
    """Two-layer head: splitting one state into two factors needs a non-linearity."""

    def __init__(self, width: int, dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, dim, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(self.hidden(x)))


# ----------------------------------------------------------------------------------------- tables


def vision_features(towers: TPADTowers, pixels: np.ndarray, num_tokens: int, batch_size: int = 64):
    """The frozen ViT's patch features of every item of `pixels` [N, H, W, 3], pooled to `num_tokens`:
    [N, num_tokens, Dv]. For a catalogue, `vision_features_of_batches` over its streamed pictures."""
    def batches():
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start:start + batch_size]
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            rows = np.arange(start, start + batch_size)
            yield {"rows": rows, "pixels": padded, "valid": rows < len(pixels)}

    return vision_features_of_batches(towers, batches(), np.arange(len(pixels)), num_tokens)


def vision_features_of_batches(towers: TPADTowers, batches, rows: np.ndarray, num_tokens: int):
    """[len(rows), num_tokens, Dv] pooled ViT features of the item `rows` (sorted), from an iterable of
    fixed-size picture batches of exactly those rows (dicts of rows [B], pixels [B, H, W, 3], valid [B],
    as `pipeline.item_batches` yields them); None when no batch comes.

    The ViT is shared and frozen, so this runs once per run instead of once per step; only one batch of
    pictures is in memory at a time, never the catalogue's. It runs on this process's devices alone, each
    batch split over them: every process computes the rows it holds (`mesh.held_rows`), so the pass is
    data-parallel over the processes, and no collective waits on a process with fewer pictures.
    """
    rows = np.asarray(rows)
    vision = towers.base(KNOWLEDGE).vision  # frozen: both towers' copies are identical
    graphdef, state = nnx.split(vision)
    local = mesh_lib.local_data_mesh(mesh_lib.local_devices_of(jax.tree.leaves(state)[0]))
    state = jax.device_put(mesh_lib.host_values(state), NamedSharding(local, PartitionSpec()))
    by_batch = NamedSharding(local, PartitionSpec(local.axis_names))

    @jax.jit
    def encode(state, chunk):
        return pool_tokens(nnx.merge(graphdef, state)(chunk), num_tokens)

    features = None
    for batch in batches:
        pixels = np.asarray(batch["pixels"])
        pad = -len(pixels) % local.size  # the batch splits evenly over the local devices
        pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), pixels.dtype)])
        # The run's mesh and axis rules (when active) would tie this to other processes: set them aside.
        with jax.set_mesh(local), nnx.logical_axis_rules(()):
            out = np.asarray(encode(state, jax.device_put(pixels, by_batch)))[:len(pixels) - pad]
        if features is None:
            features = np.zeros((len(rows), *out.shape[1:]), out.dtype)
        valid = np.asarray(batch["valid"], bool)
        features[np.searchsorted(rows, np.asarray(batch["rows"])[valid])] = out[valid]
    return features


def table_state(model: TPAD, item_prompts: dict, has_image: np.ndarray, vision: np.ndarray | None,
                vision_rows: np.ndarray | None = None, prior: np.ndarray | None = None):
    """The `tables` state of `model` filled with concrete per-item arrays (for `run_loop`'s start); rows
    past the catalogue's (`TPADConfig.rows` padding) are zeros.

    `vision` holds the rows `vision_rows` (default: all); `prior` every row's knowledge prior (when the
    model has one). A table that lives on a mesh keeps its sharding:
    each process fills only the rows its devices hold, from what it has (`mesh.held_rows`).
    """
    state = nnx.state(model, ItemTable)
    values = {name: (item_prompts[name], None) for name in ITEM_PROMPT_FIELDS}
    values["has_image"] = (has_image, None)
    if vision is not None:
        values["vision"] = (vision, vision_rows)
    if model.cfg.prior_dim:
        if prior is None:
            raise ValueError("the model has a knowledge prior (TPADConfig.prior_dim) and no prior was given")
        values["prior"] = (prior, None)
    for name, (value, value_rows) in values.items():
        variable = state["tables"][name]
        old = variable.get_value()
        value = np.asarray(value, old.dtype)
        position = np.full(old.shape[0], -1)  # table row -> its index in `value` (-1: zeros)
        position[np.arange(len(value)) if value_rows is None else np.asarray(value_rows)] = np.arange(len(value))

        def block(index, value=value, position=position):
            at = position[index[0]]
            out = np.zeros((len(at), *value.shape[1:]), value.dtype)
            out[at >= 0] = value[at[at >= 0]]
            return out[(slice(None), *index[1:])]

        if isinstance(old.sharding, NamedSharding):
            variable.set_value(jax.make_array_from_callback(old.shape, old.sharding, block))
        else:
            variable.set_value(jnp.asarray(block((slice(None),))))
    return state


# ------------------------------------------------------------------------------------- features


def visual_tokens(model: TPAD, tower: str, rows, pool_to=None):
    """Projected visual tokens of the items `rows` (any shape) for `tower`: [*rows.shape, T, D]."""
    tokens = projected_features(model, tower, model.tables["vision"][...][rows.reshape(-1)], pool_to)
    return tokens.reshape(*rows.shape, *tokens.shape[1:])


def projected_features(model: TPAD, tower: str, feats, pool_to=None):
    """`tower`'s projection of frozen-ViT features [B, T, Dv] (pooled to `pool_to` tokens): [B, T', D]."""
    if pool_to is not None and pool_to < feats.shape[1]:
        feats = pool_tokens(feats, pool_to)
    return model.towers.towers[tower].projector(feats)


def table_rows_of(model: TPAD, rows) -> dict:
    """What `item_forward_of` reads of the items `rows` [B]: their prompt fields, ViT features and prior."""
    names = ITEM_PROMPT_FIELDS + (("vision",) if model.cfg.item_visual_tokens else ()) + \
        (("prior",) if model.cfg.prior_dim else ())
    return {name: model.tables[name][...][rows] for name in names}


def item_forward(model: TPAD, rows):
    """K over the stored item prompts of `rows` [B]. Returns (hidden [B,L,D], e_K [B,d], prompt)."""
    return item_forward_of(model, table_rows_of(model, rows))


def item_forward_of(model: TPAD, item_rows: dict):
    """`item_forward` over table rows already gathered (`table_rows_of`, or the export's shard-local
    gather)."""
    prompt = {name: item_rows[name] for name in ITEM_PROMPT_FIELDS}
    image = projected_features(model, KNOWLEDGE, item_rows["vision"]) if model.cfg.item_visual_tokens else None
    hidden = model.towers(KNOWLEDGE, prompt["tokens"], image, prompt["attention_mask"])
    at_item = jnp.take_along_axis(hidden, prompt["item_pos"][:, None, None], axis=1)[:, 0]
    prompt["image"] = image
    e_k = model.knowledge_head(at_item)
    if model.cfg.prior_dim:
        # What a pretrained sentence encoder knows of the item, mapped into e_K by a trained linear map:
        # the language knowledge a CPU-sized Knowledge-MLLM trained on the catalogue's titles lacks.
        # Stage 2's alignment trains the map with the rest of K. The prior's rows are unit vectors; scaled
        # by sqrt(width) their coordinates have the unit scale of K's normed hidden states, so that Adam
        # moves the map and the head over K's state at the same relative pace.
        prior = item_rows["prior"].astype(e_k.dtype) * model.cfg.prior_dim ** 0.5
        e_k = e_k + model.prior_head(prior)
    return hidden, e_k, prompt


def item_views(model: TPAD, hidden, prompt):
    """The two single-modality views e_K is contrasted with: (image view or None, text view) [B, d].

    Image view: the item's projected visual tokens, averaged. Text view: K's hidden states over the
    prompt's text positions, averaged. Contrasting e_K with both keeps the attributes only one modality
    shows (colour in the picture, category in the title) in e_K.
    """
    # Not the <item> position: e_K is read there, so pooling it into the text view would let the view
    # InfoNCE match e_K with (a projection of) its own input instead of with what the text says.
    tokens = prompt["tokens"]
    is_text = prompt["attention_mask"] & (tokens != model.cfg.image_token_id)
    is_text = is_text & (jnp.arange(tokens.shape[1])[None, :] != prompt["item_pos"][:, None])
    text_mask = is_text.astype(hidden.dtype)[..., None]
    text = jnp.sum(hidden * text_mask, axis=1) / jnp.maximum(jnp.sum(text_mask, axis=1), 1.0)
    image = prompt["image"]
    image_view = None if image is None else model.image_view_head(jnp.mean(image, axis=1))
    return image_view, model.text_view_head(text)


def token_cross_entropy(model: TPAD, tower: str, hidden, tokens, loss_mask, valid=None, max_targets=None):
    """Mean next-token cross-entropy over positions whose *next* token is a target (loss_mask there).

    Args:
      max_targets: when set, logits are computed only at the first `max_targets` target positions of
        each row, not at all L: the prompt layouts bound how many a row has (a session prompt's next
        title, an item prompt's text budget), and the vocabulary projection and its gradient are the
        largest per-position matmuls. A row with more targets would lose the extra ones.
    """
    # loss_mask[t] already means "token t+1 is a target" (data/prompts.py), i.e. "score the prediction
    # made at t": it lines up with hidden[:, :-1], not with tokens[:, 1:].
    mask = loss_mask[:, :-1]
    if valid is not None:
        mask = mask & valid[:, None]
    hidden, targets = hidden[:, :-1], tokens[:, 1:]
    if max_targets is not None and max_targets < mask.shape[1]:
        # A stable sort puts each row's target positions first, in order; padding slots stay masked.
        order = jnp.argsort(~mask, axis=1, stable=True)[:, :max_targets]
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        mask = jnp.take_along_axis(mask, order, axis=1)
    logits = model.towers.logits(hidden, tower).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


ALIGN_ESTIMATORS = ("infonce", "nwj", "jsd")


def _scores(za, zb, temperature, ids, negatives=None, negative_ids=None):
    """Cosine critic scores / temperature [B, B + K]; a column holding the row positive's item is not a
    negative. `negatives` [K, d] (item ids `negative_ids` [K]) are extra columns shared by every row."""
    scores = mi.critic_scores(za, zb, temperature=temperature, negatives=negatives)
    if ids is not None:
        same = (ids[:, None] == ids[None, :]) & ~jnp.eye(len(ids), dtype=bool)
        if negatives is not None:
            same = jnp.concatenate([same, ids[:, None] == negative_ids[None, :]], axis=1)
        scores = jnp.where(same, -jnp.inf, scores)
    return scores


def nce(za, zb, temperature, mask, ids=None):
    """InfoNCE(za_i ; zb_i) over the batch and its top-1 accuracy.

    Args:
      ids: optional [B] item ids of the positives; a column holding the same item as the row's positive
        is not a negative (it would be a false one).
    """
    scores = _scores(za, zb, temperature, ids)
    return mi.infonce(scores, mask=mask), mi.infonce_accuracy(scores, mask=mask)


def mi_terms(za, zb, temperature, mask, ids=None, estimator="infonce", negatives=None, negative_ids=None):
    """(objective to maximise, MI lower bound in nats, top-1 accuracy) of za_i and zb_i under `estimator`.

    One critic (the cosine of the heads / temperature) and one set of negatives (the rest of the batch
    and any extra `negatives`, false negatives left out) for every estimator, so they differ only in
    the bound: InfoNCE's softmax, NWJ's E_P[T] - E_Q[e^(T-1)], or JSD's softplus objective with the NWJ
    value it implies.
    """
    scores = _scores(za, zb, temperature, ids, negatives, negative_ids)
    accuracy = mi.infonce_accuracy(scores, mask=mask)
    if estimator == "infonce":
        bound = mi.infonce(scores, mask=mask)
        return bound, bound, accuracy
    joint, joint_valid, marginal, marginal_valid = mi.joint_and_marginal(scores, mask=mask)
    if estimator == "nwj":
        bound = mi.nwj(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid)
        return bound, bound, accuracy
    if estimator == "jsd":
        return (*mi.jsd(joint, marginal, joint_valid=joint_valid, marginal_valid=marginal_valid), accuracy)
    raise ValueError(f"stage2.align_estimator must be one of {ALIGN_ESTIMATORS}, got {estimator!r}")


# ----------------------------------------------------------------------------------------- losses


def word_reconstruction(model: TPAD, e_k, prompt, valid):
    """Cross-entropy of the item's own title and category words (a bag) decoded from e_K.

    The generation loss trains K's token states, never the `<item>` state that e_K reads; this term makes
    e_K itself carry what the item's text says, so items that share attributes share a direction.
    """
    targets = prompt["tokens"][:, 1:]
    weight = (prompt["loss_mask"][:, :-1] & valid[:, None]).astype(jnp.float32)
    rows = jnp.broadcast_to(jnp.arange(targets.shape[0])[:, None], targets.shape)
    bag = jnp.zeros((targets.shape[0], model.cfg.mllm.lm.vocab_size), jnp.float32)
    bag = bag.at[rows, targets].add(weight)
    counts = jnp.sum(bag, axis=1)
    logp = jax.nn.log_softmax(model.word_decoder(e_k).astype(jnp.float32), axis=-1)
    per_item = -jnp.sum(bag * logp, axis=1) / jnp.maximum(counts, 1.0)
    has_words = (counts > 0).astype(jnp.float32)
    return jnp.sum(per_item * has_words) / jnp.maximum(jnp.sum(has_words), 1.0)


def knowledge_loss(model: TPAD, rows, valid, contrastive_weight: float, temperature: float,
                   reconstruct_weight: float = 1.0, *, max_targets=None, forward=None):
    """Stage-1 loss of K on items `rows` [B]: caption generation + InfoNCE of e_K with its image view and
    its text view.

    Args:
      max_targets: caption targets per item prompt at most (`token_cross_entropy`), e.g. max_item_tokens.
      forward: `item_forward(model, rows)` when the caller already ran it (`item_forwards`).
    """
    hidden, e_k, prompt = item_forward(model, rows) if forward is None else forward
    gen = token_cross_entropy(model, KNOWLEDGE, hidden, prompt["tokens"], prompt["loss_mask"], valid,
                              max_targets)
    metrics = {"caption_ce": gen}
    loss = gen
    if reconstruct_weight:
        words = word_reconstruction(model, e_k, prompt, valid)
        loss = loss + reconstruct_weight * words
        metrics["word_ce"] = words
    if contrastive_weight:
        image_view, text_view = item_views(model, hidden, prompt)
        text, text_acc = nce(e_k, text_view, temperature, valid, ids=rows)
        metrics.update(text_view_infonce=text, text_view_acc=text_acc)
        views = text
        if image_view is not None:
            image, image_acc = nce(e_k, image_view, temperature, valid & model.tables["has_image"][...][rows],
                                   ids=rows)
            metrics.update(image_view_infonce=image, image_view_acc=image_acc)
            views = (text + image) / 2
        loss = loss - contrastive_weight * views
    return loss, metrics


def transition_loss(model: TPAD, session: dict, cfg, m: int, *, max_targets=None, item_embeddings=None,
                    negatives=None):
    """Stage-2 objective on a session batch: generation, disentanglement, alignment, MMD.

    Args:
      session: a session batch (docs/architecture.md §2).
      cfg: `config.stage2` (weights, disentangle mode, temperature).
      m: visual tokens per item in session prompts.
      max_targets: next-title tokens per prompt at most (`token_cross_entropy`), e.g. max_title_tokens.
      item_embeddings: e_K [B, S + 1, d] of `shown_and_target(session)` when the caller already ran K
        over them (`item_forwards`); computed here otherwise.
      negatives: optional (e_K [K, d], item rows [K]) of extra items, negatives of every alignment pair
        (`stage2.negatives`); their gradient reaches K as the positives' does.
    """
    rows, next_rows = session["rows"], session["next_rows"]  # next_rows only names the positives
    mask = (session["row_mask"] & session["valid"][:, None]).reshape(-1)
    if model.cfg.item_visual_tokens:
        # Shown items are left-aligned and own m consecutive <image> slots each: slot k is item k // m.
        slots = visual_tokens(model, TRANSFER, rows, pool_to=m)
        slots = slots.reshape(rows.shape[0], -1, slots.shape[-1])
    else:
        slots = None
    hidden = model.towers(TRANSFER, session["tokens"], slots, session["attention_mask"])
    gen = token_cross_entropy(model, TRANSFER, hidden, session["tokens"], session["loss_mask"],
                              session["valid"], max_targets)
    metrics = {"gen_ce": gen}
    loss = cfg.gen_weight * gen

    states = jnp.take_along_axis(hidden, session["sep_pos"][..., None], axis=1)  # [B, S, D]
    width = states.shape[-1]
    z_trans = model.trans_head(states.reshape(-1, width))
    # e_K of the shown items and the target in one K pass; gradients reach K: the distillation.
    e_all = item_embeddings
    if e_all is None:
        both = shown_and_target(session)
        e_all = item_forward(model, both.reshape(-1))[1].reshape(*both.shape, -1)
    e_cur = e_all[:, :-1].reshape(-1, e_all.shape[-1])
    e_next = _next_embeddings(e_all, session["row_mask"]).reshape(-1, e_all.shape[-1])

    extra, extra_ids = negatives if negatives is not None else (None, None)
    objective, align, align_acc = mi_terms(z_trans, e_next, cfg.temperature, mask, ids=next_rows.reshape(-1),
                                           estimator=cfg.align_estimator, negatives=extra,
                                           negative_ids=extra_ids)
    metrics.update(align_mi=align, align_acc=align_acc)
    loss = loss - cfg.align_weight * objective

    if cfg.disentangle != "none":
        z_know = model.know_head(states.reshape(-1, width))
        # z_know is pulled to K's knowledge, not K to T's states: alignment is the only stage-2 term
        # through which sessions reach K, so that `no-align` leaves K trained by the keep term alone.
        know, know_acc = nce(z_know, jax.lax.stop_gradient(e_cur), cfg.temperature, mask, ids=rows.reshape(-1))
        if cfg.disentangle == "club":
            separation, critic_nll = _club_terms(model, z_trans, z_know, mask)
            loss = loss + critic_nll  # fits q(z_know | z_trans); only the critic's weights see it
            metrics["critic_nll"] = critic_nll
        elif cfg.disentangle == "orthogonal":
            separation = _masked_mean(_cosine(z_trans, z_know) ** 2, mask)
        else:
            raise ValueError(f"stage2.disentangle must be club, orthogonal or none, got {cfg.disentangle!r}")
        loss = loss + cfg.disentangle_weight * (separation - know)
        metrics.update(know_infonce=know, know_acc=know_acc, separation=separation)
    if cfg.mmd_weight:
        discrepancy = mi.mmd(e_next, z_trans, x_mask=mask, y_mask=mask)
        loss = loss + cfg.mmd_weight * discrepancy
        metrics["mmd"] = discrepancy
    return loss, metrics


def shown_and_target(session):
    """Item rows [B, S + 1] of a session batch's shown items and its target: what K embeds in stage 2."""
    return jnp.concatenate([session["rows"], session["target"][:, None]], axis=1)


def item_forwards(model: TPAD, *row_sets):
    """`item_forward` of several row sets ([B_i] each) as one K pass, split back per set.

    One batch instead of several: the step holds one K pass to compile (stage 2's compile time drops by
    a fifth) and its matmuls are taller.
    """
    forward = item_forward(model, jnp.concatenate(row_sets))
    bounds = np.cumsum([0] + [len(rows) for rows in row_sets])
    return [_slice_rows(forward, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _slice_rows(tree, lo, hi):
    return jax.tree.map(lambda x: x[lo:hi], tree)


def _next_embeddings(e_all, row_mask):
    """e_K of the item after each shown item: the next shown one, or the target after the last.

    Equals e_K(next_rows) of the session batch for left-aligned rows, at half the cost of a second pass.
    """
    num_shown = e_all.shape[1] - 1
    last = jnp.sum(row_mask.astype(jnp.int32), axis=1, keepdims=True) - 1
    index = jnp.arange(num_shown)[None, :] + 1
    index = jnp.where(index > last, num_shown, index)
    return jnp.take_along_axis(e_all, index[..., None], axis=1)


def _club_terms(model: TPAD, z_trans, z_know, mask):
    """(CLUB bound with the critic frozen, the critic's NLL with the encoders frozen).

    On unit vectors, like every other term here: on raw head outputs the encoders can scale their
    features to drive the estimate of a lagging critic to minus infinity.
    """
    z_trans, z_know = _unit(z_trans), _unit(z_know)
    graphdef, state = nnx.split(model.club_critic)
    frozen_critic = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    bound = mi.club(*frozen_critic(z_trans), z_know, mask=mask)
    critic_nll = mi.club_q_loss(*model.club_critic(jax.lax.stop_gradient(z_trans)),
                                jax.lax.stop_gradient(z_know), mask=mask)
    # Per dimension, so the critic's gradient does not dominate the shared global-norm clip.
    return bound, critic_nll / z_know.shape[-1]


def _unit(x):
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def _cosine(a, b):
    return jnp.sum(_unit(a) * _unit(b), axis=-1)


def _masked_mean(x, mask):
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
