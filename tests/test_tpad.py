"""The TPAD objective's wiring: which terms reach which tower, and the stage-2 shortcuts it takes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tpad_base
from tpad_jax import rows
from tpad_jax.data import prompts
from tpad_jax.models import mllm
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.train import stages

NUM_ITEMS, ITEM_LEN, IMAGE_TOKEN, VOCAB, M, S = 10, 9, 3, 40, 1, 3


def tiny_items(seed=0):
    """The item prompts and pictures of `tiny_model`'s catalogue."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, VOCAB, size=(NUM_ITEMS, ITEM_LEN)).astype(np.int32)
    tokens[:, 1:5] = IMAGE_TOKEN
    prompts = {"tokens": tokens, "attention_mask": np.ones((NUM_ITEMS, ITEM_LEN), bool),
               "loss_mask": np.zeros((NUM_ITEMS, ITEM_LEN), bool),
               "item_pos": np.full(NUM_ITEMS, ITEM_LEN - 1)}
    prompts["loss_mask"][:, 5:7] = True
    pixels = rng.uniform(-1, 1, size=(NUM_ITEMS, 32, 32, 3)).astype(np.float32)
    return prompts, pixels


def tiny_model(seed=0, prior_dim=0):
    mllm_cfg = mllm.MLLMConfig.tiny(VOCAB, image_size=32)
    cfg = tpad_lib.TPADConfig(mllm=mllm_cfg, embed_dim=8, image_token_id=IMAGE_TOKEN, num_items=NUM_ITEMS,
                              item_prompt_length=ITEM_LEN, item_visual_tokens=4, prior_dim=prior_dim)
    model = tpad_lib.TPAD(cfg, rngs=nnx.Rngs(seed))
    prompts, pixels = tiny_items(seed)
    vision = tpad_lib.vision_features(model.towers, pixels, 4, batch_size=4)
    prior = np.random.default_rng(seed).normal(size=(NUM_ITEMS, prior_dim)).astype(np.float32)
    nnx.update(model, tpad_lib.table_state(model, prompts, np.ones(NUM_ITEMS, bool), vision,
                                           prior=prior if prior_dim else None))
    # LoRA B starts at zero; perturb it so gradients into LoRA A are not trivially zero either.
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.LoRAParam):
            variable.set_value(variable.get_value() + 0.01)
    return model


def session_batch():
    """Two sessions: three shown items and two shown items, left-aligned, with their next items."""
    rows = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
    row_mask = np.array([[True, True, True], [True, True, False]])
    target = np.array([6, 7], np.int32)
    next_rows = np.array([[2, 3, 6], [5, 7, 0]], np.int32)
    length = S * (M + 2) + 4
    rng = np.random.default_rng(1)
    tokens = rng.integers(6, VOCAB, size=(2, length)).astype(np.int32)
    sep_pos = np.array([[2, 5, 8], [2, 5, 0]], np.int32)
    for b in range(2):
        for j in range(S):
            if row_mask[b, j]:
                tokens[b, sep_pos[b, j] - 2] = IMAGE_TOKEN
    loss_mask = np.zeros((2, length), bool)
    loss_mask[:, -3:-1] = True
    return {"rows": rows, "row_mask": row_mask, "next_rows": next_rows, "target": target, "tokens": tokens,
            "attention_mask": np.ones((2, length), bool), "loss_mask": loss_mask, "sep_pos": sep_pos,
            "valid": np.array([True, True])}


def stage2_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(gen_weight=1.0, disentangle="club", disentangle_weight=0.1,
                                         align_weight=1.0, mmd_weight=0.0, temperature=0.1,
                                         align_estimator="infonce"))
    cfg.update(overrides)
    return cfg


def test_next_embeddings_shortcut_equals_embedding_the_next_rows():
    model = tiny_model()
    batch = session_batch()
    both = tpad_lib.shown_and_target(jax.tree.map(jnp.asarray, batch))
    e_all = tpad_lib.item_forward(model, both.reshape(-1))[1].reshape(*both.shape, -1)
    shortcut = tpad_lib._next_embeddings(e_all, jnp.asarray(batch["row_mask"]))
    _, direct, _ = tpad_lib.item_forward(model, jnp.asarray(batch["next_rows"]).reshape(-1))
    direct = direct.reshape(2, S, -1)
    valid = batch["row_mask"]
    np.testing.assert_allclose(np.asarray(shortcut)[valid], np.asarray(direct)[valid], atol=1e-5)


def test_logits_at_the_targets_only_give_the_same_loss_and_gradients():
    model = tiny_model()
    batch = jax.tree.map(jnp.asarray, session_batch())
    batch["valid"] = jnp.array([True, False])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    hidden = model.towers(tpad_lib.TRANSFER, batch["tokens"], None, batch["attention_mask"])

    def loss(params, max_targets):
        return tpad_lib.token_cross_entropy(nnx.merge(graphdef, params, rest), tpad_lib.TRANSFER, hidden,
                                            batch["tokens"], batch["loss_mask"], batch["valid"], max_targets)

    # The session batch has 2 targets per row: max_targets 2 holds them all, 3 leaves a masked slot.
    reference, reference_grads = jax.value_and_grad(loss)(params, None)
    for max_targets in (2, 3):
        value, grads = jax.value_and_grad(loss)(params, max_targets)
        np.testing.assert_allclose(float(value), float(reference), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
                     reference_grads)


def test_one_k_pass_over_several_row_sets_equals_separate_passes():
    model = tiny_model()
    batch = jax.tree.map(jnp.asarray, session_batch())
    shown, keep_rows = tpad_lib.shown_and_target(batch), jnp.array([9, 0, 4])
    (_, e_shown, _), keep_forward = tpad_lib.item_forwards(model, shown.reshape(-1), keep_rows)
    joint = tpad_lib.transition_loss(model, batch, stage2_cfg(), M,
                                     item_embeddings=e_shown.reshape(*shown.shape, -1))[0]
    separate = tpad_lib.transition_loss(model, batch, stage2_cfg(), M)[0]
    np.testing.assert_allclose(float(joint), float(separate), rtol=1e-6)
    valid = jnp.ones(3, bool)
    joint = tpad_lib.knowledge_loss(model, keep_rows, valid, 0.1, 0.1, forward=keep_forward)[0]
    separate = tpad_lib.knowledge_loss(model, keep_rows, valid, 0.1, 0.1)[0]
    np.testing.assert_allclose(float(joint), float(separate), rtol=1e-6)


def _grad_norms(model, cfg, patterns=tpad_lib.GROUP_PATTERNS):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, session_batch())

    def loss(params):
        return tpad_lib.transition_loss(nnx.merge(graphdef, params, rest), batch, cfg, M)[0]

    grads = jax.grad(loss)(params)
    norms = {}
    for group, pattern in patterns.items():
        leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
                  if __import__("re").search(pattern, "/".join(str(getattr(k, "key", k)) for k in path))]
        norms[group] = float(sum(jnp.sum(leaf ** 2) for leaf in leaves)) ** 0.5
    return norms


def test_alignment_is_what_reaches_the_knowledge_tower():
    model = tiny_model()
    with_align = _grad_norms(model, stage2_cfg(disentangle="none"))
    without_align = _grad_norms(model, stage2_cfg(disentangle="none", align_weight=0.0))
    assert with_align["knowledge"] > 1e-6
    assert without_align["knowledge"] == 0.0  # generation trains T only
    assert with_align["transfer"] > 1e-6 and without_align["transfer"] > 1e-6
    assert with_align["base"] > 0  # gradients exist; the optimizer's trainable filter freezes the base


@pytest.mark.parametrize("estimator", ["infonce", "nwj", "jsd"])
def test_every_alignment_estimator_trains_k_and_reports_a_bound(estimator):
    model = tiny_model()
    cfg = stage2_cfg(disentangle="none", gen_weight=0.0, align_estimator=estimator)
    loss, metrics = tpad_lib.transition_loss(model, jax.tree.map(jnp.asarray, session_batch()), cfg, M)
    # With only alignment weighted the loss is -objective; NWJ's and InfoNCE's objective is their bound.
    assert np.isfinite(float(metrics["align_mi"]))
    if estimator != "jsd":  # JSD maximises its own objective, not the bound it reports
        assert float(loss) == pytest.approx(-float(metrics["align_mi"]), rel=1e-5)
    assert _grad_norms(model, cfg)["knowledge"] > 1e-6


def test_extra_negatives_are_columns_of_every_row_and_never_the_rows_own_item():
    rng = np.random.default_rng(3)
    za, zb, extra = (rng.normal(size=shape).astype(np.float32) for shape in ((4, 5), (4, 5), (3, 5)))
    ids, extra_ids = np.array([7, 8, 7, 9]), np.array([8, 1, 9])
    mask = np.array([True, True, True, False])
    bound, _, accuracy = tpad_lib.mi_terms(za, zb, 0.5, mask, ids=ids, negatives=extra, negative_ids=extra_ids)
    # By hand: cosine / 0.5 against the valid batch rows and the three extra items; a column holding the
    # row's own positive item (in the batch or among the extras) is left out; log N counts every column.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    candidates = np.concatenate([unit(zb[:3]), unit(extra)])
    candidate_ids = np.concatenate([ids[:3], extra_ids])
    losses, correct = [], []
    for i in range(3):
        scores = unit(za)[i] @ candidates.T / 0.5
        keep = np.array([j == i or candidate_ids[j] != ids[i] for j in range(len(candidates))])
        assert keep.sum() < len(candidates)  # every row here has a false negative to leave out
        losses.append(np.log(np.sum(np.exp(scores[keep]))) - scores[i])
        others = keep & (np.arange(len(candidates)) != i)
        correct.append(scores[i] > scores[others].max())
    np.testing.assert_allclose(float(bound), np.log(len(candidates)) - np.mean(losses), rtol=1e-5)
    assert float(accuracy) == pytest.approx(np.mean(correct))


def test_extra_negatives_send_their_gradient_into_k():
    model = tiny_model()
    batch = jax.tree.map(jnp.asarray, session_batch())
    cfg = stage2_cfg(disentangle="none", gen_weight=0.0)
    negative_rows = jnp.array([8, 9], jnp.int32)  # items no session of the batch shows

    def alignment(e_negative):
        negatives = (e_negative, negative_rows)
        return tpad_lib.transition_loss(model, batch, cfg, M, negatives=negatives)[0]

    e_negative = tpad_lib.item_forward(model, negative_rows)[1]
    assert float(jnp.linalg.norm(jax.grad(alignment)(e_negative))) > 1e-6


def test_an_unknown_alignment_estimator_is_named():
    with pytest.raises(ValueError, match="align_estimator must be one of.*'mine'"):
        tpad_lib.transition_loss(tiny_model(), jax.tree.map(jnp.asarray, session_batch()),
                                 stage2_cfg(align_estimator="mine"), M)


def test_critic_sees_only_its_own_likelihood():
    model = tiny_model()
    norms = _grad_norms(model, stage2_cfg(gen_weight=0.0, align_weight=0.0, disentangle_weight=0.0))
    # With every weighted term at zero only the critic's fit remains: nothing else may move.
    assert norms["critic"] > 1e-6
    assert norms["knowledge"] == 0.0 and norms["transfer"] == 0.0


@pytest.mark.parametrize("mode", ["club", "orthogonal", "none"])
def test_every_disentangle_mode_gives_finite_terms(mode):
    model = tiny_model()
    batch = jax.tree.map(jnp.asarray, session_batch())
    loss, metrics = tpad_lib.transition_loss(model, batch, stage2_cfg(disentangle=mode, mmd_weight=0.1), M)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(value)) for value in metrics.values())
    assert ("separation" in metrics) == (mode != "none")


def test_word_reconstruction_is_the_cross_entropy_of_the_items_word_bag():
    model = tiny_model()
    rows = jnp.arange(4)
    _, e_k, prompt = tpad_lib.item_forward(model, rows)
    valid = jnp.array([True, True, True, False])
    value = float(tpad_lib.word_reconstruction(model, e_k, prompt, valid))

    logits = np.asarray(model.word_decoder(e_k), np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    tokens, loss_mask = np.asarray(prompt["tokens"]), np.asarray(prompt["loss_mask"])
    expected = []
    for b in range(3):  # row 3 is not valid
        words = [tokens[b, t + 1] for t in range(tokens.shape[1] - 1) if loss_mask[b, t]]
        expected.append(-np.mean([logp[b, w] for w in words]))
    np.testing.assert_allclose(value, np.mean(expected), rtol=1e-5)


def test_vision_features_of_streamed_batches_equal_one_array_pass():
    model = tiny_model()
    pixels = np.random.default_rng(1).uniform(-1, 1, size=(NUM_ITEMS, 32, 32, 3)).astype(np.float32)
    expected = tpad_lib.vision_features(model.towers, pixels, 4, batch_size=4)
    # Batches as pipeline.item_batches gives them: out of order, the last padded with an invalid row 0.
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4, 0, 0]
    valid = [True] * NUM_ITEMS + [False, False]
    batches = [{"rows": np.array(order[i:i + 4]), "pixels": pixels[order[i:i + 4]],
                "valid": np.array(valid[i:i + 4])} for i in range(0, 12, 4)]
    got = tpad_lib.vision_features_of_batches(model.towers, batches, np.arange(NUM_ITEMS), 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_export_embeds_every_item_once_in_wrapped_chunks():
    from tpad_jax import export

    model = tiny_model()
    embeddings = export.item_embeddings(model, batch_size=4)  # 10 items: the third chunk wraps around
    _, expected, _ = tpad_lib.item_forward(model, jnp.arange(NUM_ITEMS))
    assert embeddings.shape == (NUM_ITEMS, 8) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, np.asarray(expected), atol=1e-5)


# ------------------------------------------------------------------------ generation targets
# Prompts written by the prompt builder with hand-picked ids (specials 0..5, words in the 90s), so the
# documented targets can be found by value: the title and category ids, the next title and <eos>.
_PAD, _BOS, _EOS, _IMG, _ITEM, _SEP = range(6)
_VOCAB = prompts.PromptVocab(pad=_PAD, bos=_BOS, eos=_EOS, image=_IMG, item=_ITEM, sep=_SEP,
                             item_word=(91, 94), category_word=(92, 94), next_word=(93, 94), period=(95,))
_LOGIT_VOCAB = 100


class _IdentityLogits:
    """Stands in for a tower whose logits are the hidden states themselves."""

    def __init__(self):
        self.towers = self

    def logits(self, hidden, tower):
        del tower
        return hidden


def _generation_losses(tokens, loss_mask, target_positions, max_targets):
    """(CE of a predictor perfect at `target_positions` and uniform elsewhere,
    [CE of the same predictor made uniform at one target t] for each t)."""
    length = len(tokens)

    def loss_with(perfect):
        hidden = np.zeros((1, length, _LOGIT_VOCAB), np.float32)
        for position in perfect:  # the prediction of token `position` is made at position - 1
            hidden[0, position - 1, tokens[position]] = 60.0
        return float(tpad_lib.token_cross_entropy(_IdentityLogits(), tpad_lib.TRANSFER, jnp.asarray(hidden),
                                                  jnp.asarray(tokens)[None], jnp.asarray(loss_mask)[None],
                                                  None, max_targets))

    return loss_with(target_positions), [loss_with([p for p in target_positions if p != t])
                                         for t in target_positions]


@pytest.mark.parametrize("max_targets", [None, 12])
def test_generation_loss_scores_the_title_and_category_tokens_of_an_item_prompt(max_targets):
    title, category = [10, 11, 12], [20, 21]
    prompt = prompts.item_prompt(_VOCAB, title, category, True, n_img=2, max_item_tokens=12)
    tokens = prompt["tokens"].tolist()
    targets = [tokens.index(token) for token in title + category]
    perfect, one_missed = _generation_losses(tokens, prompt["loss_mask"], targets, max_targets)
    assert perfect < 1e-6
    # Uniform at one target costs log V over the number of targets: every target is scored, once.
    np.testing.assert_allclose(one_missed, np.log(_LOGIT_VOCAB) / len(targets), rtol=1e-5)


@pytest.mark.parametrize("max_targets", [None, 4])
def test_generation_loss_scores_the_next_title_and_eos_of_a_session_prompt(max_targets):
    next_title = [30, 31, 32]
    prompt = prompts.session_prompt(_VOCAB, [[10, 11], [12]], [True, True], next_title, m=1,
                                    max_title_tokens=3, max_prompt_items=3)
    tokens = prompt["tokens"].tolist()
    targets = [tokens.index(token) for token in next_title + [_EOS]]
    perfect, one_missed = _generation_losses(tokens, prompt["loss_mask"], targets, max_targets)
    assert perfect < 1e-6
    np.testing.assert_allclose(one_missed, np.log(_LOGIT_VOCAB) / len(targets), rtol=1e-5)


# ------------------------------------------------------------------------------ ablations
@pytest.mark.parametrize("variant", rows.names(rows.stage2_variants()))
def test_only_alignment_sends_sessions_into_k_at_every_variants_shipped_settings(variant):
    shipped = stages.stage2_config(tpad_base.get_config(), variant).stage2
    norms = _grad_norms(tiny_model(), shipped)
    assert norms["transfer"] > 1e-6
    if variant == "no-align":
        assert norms["knowledge"] == 0.0  # K is left to the keep term (stages.stage2_spec)
    else:
        assert norms["knowledge"] > 1e-6


@pytest.mark.parametrize("variant", ["tpad", "no-align"])
def test_alignment_trains_the_knowledge_priors_map_into_e_k(variant):
    shipped = stages.stage2_config(tpad_base.get_config(), variant).stage2
    norms = _grad_norms(tiny_model(prior_dim=5), shipped, {"prior": r"prior_head/"})
    assert (norms["prior"] > 1e-6) if variant == "tpad" else (norms["prior"] == 0.0)
    # The map is K's: its optimizer group trains it at K's rate.
    assert __import__("re").search(tpad_lib.GROUP_PATTERNS[tpad_lib.KNOWLEDGE], "prior_head/kernel")


def test_text_view_pools_the_text_positions_but_not_the_item_position():
    model = tiny_model()
    _, _, prompt = tpad_lib.item_forward(model, jnp.arange(3))
    hidden = jax.random.normal(jax.random.key(0), (3, ITEM_LEN, model.cfg.mllm.lm.hidden_size))
    # tiny_model's layout: <bos>-like token at 0, image slots 1..4, text 5..ITEM_LEN-2, <item> last.
    text_positions = [0] + list(range(5, ITEM_LEN - 1))
    expected = model.text_view_head(jnp.mean(hidden[:, text_positions], axis=1))
    _, text_view = tpad_lib.item_views(model, hidden, prompt)
    np.testing.assert_allclose(np.asarray(text_view), np.asarray(expected), rtol=1e-5, atol=1e-6)
