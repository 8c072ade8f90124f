"""Session encoders: shapes, padding invariance, causality, SR-GNN graphs, content path, training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tpad_base
from tpad_jax.models import session_encoders

NUM_ITEMS = 12
CONTENT_DIM = 5


def _config(encoder, causal=True, dropout=0.0):
    return session_encoders.EncoderConfig(
        encoder=encoder, causal=causal, hidden_dim=16, num_layers=1, num_heads=2, dropout=dropout,
        gnn_steps=2, max_length=8,
    )


def _content():
    return jax.random.normal(jax.random.key(99), (NUM_ITEMS, CONTENT_DIM))


def _encoder(encoder, causal=True, content=True, dropout=0.0, seed=0):
    model = session_encoders.SessionEncoder(
        _config(encoder, causal, dropout), NUM_ITEMS, _content() if content else None, rngs=nnx.Rngs(seed)
    )
    return nnx.view(model, deterministic=True)


def _sessions():
    """Two right-padded sessions of lengths 5 and 3 (one with a repeated item), width 5."""
    items = jnp.array([[3, 7, 3, 9, 1], [4, 4, 2, 0, 0]], jnp.int32)
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    return items, mask


# One compiled call per shape instead of hundreds of eagerly dispatched ops.
_session_vectors = nnx.jit(lambda model, items, mask: model(items, mask))
_scores = nnx.jit(lambda model, items, mask: model.scores(items, mask))

ALL_VARIANTS = [("transformer", True), ("transformer", False), ("srgnn", True), ("gru4rec", True)]


@pytest.mark.parametrize("encoder, causal", ALL_VARIANTS)
@pytest.mark.parametrize("content", [True, False])
def test_shapes_and_padding_invariance(encoder, causal, content):
    model = _encoder(encoder, causal, content)
    items, mask = _sessions()
    full = _session_vectors(model, items, mask)
    assert full.shape == (2, 16)
    assert model.item_table().shape == (NUM_ITEMS, 16)
    scores = _scores(model, items, mask)
    assert scores.shape == (2, NUM_ITEMS)
    assert bool(jnp.all(jnp.isfinite(scores)))
    padded_items = jnp.pad(items, ((0, 0), (0, 3)))
    padded_mask = jnp.pad(mask, ((0, 0), (0, 3)))
    np.testing.assert_allclose(_session_vectors(model, padded_items, padded_mask), full, rtol=1e-5, atol=1e-6)
    # The second session alone (no batch neighbour, no trailing padding) gives the same vector too.
    np.testing.assert_allclose(_session_vectors(model, items[1:, :3], mask[1:, :3])[0], full[1], atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_transformer_position_equals_truncated_prefix(causal):
    model = _encoder("transformer", causal)
    items, mask = _sessions()
    states = model.body.hidden_states(model.item_table()[items], mask)
    prefix_vec = _session_vectors(model, items[:, :3], mask[:, :3])
    gap = float(jnp.max(jnp.abs(states[0, 2] - prefix_vec[0])))
    if causal:
        assert gap < 1e-5
    else:
        # Bidirectional position 2 sees the later clicks, so the check above really tests causality.
        assert gap > 1e-3


@pytest.mark.parametrize("encoder, causal", [("transformer", True), ("gru4rec", True)])
def test_position_vectors_equal_the_vectors_of_every_prefix(encoder, causal):
    model = _encoder(encoder, causal)
    items, mask = _sessions()
    every = nnx.jit(lambda model, items, mask: model.position_vectors(items, mask))(model, items, mask)
    for length in range(1, 6):
        prefix = _session_vectors(model, items[:, :length], mask[:, :length])
        valid = np.asarray(mask[:, length - 1])
        np.testing.assert_allclose(np.asarray(every[:, length - 1])[valid], np.asarray(prefix)[valid],
                                   atol=1e-5)


@pytest.mark.parametrize("encoder, causal", [("transformer", False), ("srgnn", True)])
def test_position_vectors_refuse_encoders_that_see_later_clicks(encoder, causal):
    model = _encoder(encoder, causal)
    assert not model.cfg.reads_every_position
    with pytest.raises(ValueError, match="causal"):
        model.position_vectors(*_sessions())


def test_srgnn_graph_of_hand_made_session():
    # Clicks 5 2 7 2 9 then two padding slots: nodes sit at positions 0 (5), 1 (2), 2 (7), 4 (9).
    items = jnp.array([5, 2, 7, 2, 9, 0, 0], jnp.int32)
    mask = jnp.array([True] * 5 + [False] * 2)
    alias, a_in, a_out = session_encoders.srgnn_graph(items, mask)
    np.testing.assert_array_equal(alias[:5], [0, 1, 2, 1, 4])
    # Edges 5->2, 2->7, 7->2, 2->9; node 2 has out-degree 2 and in-degree 2.
    expected_out = np.zeros((7, 7))
    expected_out[0, 1] = 1.0
    expected_out[1, 2] = expected_out[1, 4] = 0.5
    expected_out[2, 1] = 1.0
    expected_in = np.zeros((7, 7))
    expected_in[1, 0] = expected_in[1, 2] = 0.5
    expected_in[2, 1] = 1.0
    expected_in[4, 1] = 1.0
    np.testing.assert_allclose(a_out, expected_out)
    np.testing.assert_allclose(a_in, expected_in)


def test_srgnn_graph_counts_a_repeated_transition_once():
    alias, a_in, a_out = session_encoders.srgnn_graph(jnp.array([1, 2, 1, 2], jnp.int32), jnp.ones((4,), bool))
    np.testing.assert_array_equal(alias, [0, 1, 0, 1])
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 1.0
    np.testing.assert_allclose(a_out, expected)
    np.testing.assert_allclose(a_in, expected.T)


def test_item_with_zeroed_id_embedding_scores_by_content():
    model = _encoder("transformer")
    cold = 6
    model.id_embedding.embedding[...] = model.id_embedding.embedding[...].at[cold].set(0.0)
    items, mask = _sessions()
    session_vecs = model(items, mask)
    projected = model.content_projection(model.content[...][cold])
    np.testing.assert_allclose(model.scores(items, mask)[:, cold], session_vecs @ projected, rtol=1e-5)
    assert float(jnp.min(jnp.abs(model.scores(items, mask)[:, cold]))) > 1e-4
    # Without its content the cold item is blind: its score collapses to zero.
    model.content[...] = model.content[...].at[cold].set(0.0)
    np.testing.assert_allclose(model.scores(items, mask)[:, cold], 0.0, atol=1e-7)


def test_mlp_content_projection_scores_cold_items_by_content():
    cfg = dataclasses.replace(_config("transformer"), content_projection="mlp")
    model = nnx.view(session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), rngs=nnx.Rngs(0)), deterministic=True)
    cold = 6
    model.id_embedding.embedding[...] = model.id_embedding.embedding[...].at[cold].set(0.0)
    items, mask = _sessions()
    projected = model.content_projection(model.content[...][cold])
    np.testing.assert_allclose(model.scores(items, mask)[:, cold], model(items, mask) @ projected, rtol=1e-5)
    with pytest.raises(ValueError, match="content_projection must be one of"):
        dataclasses.replace(cfg, content_projection="attention")


def test_id_dropout_drops_whole_items_in_training_only():
    cfg = dataclasses.replace(_config("transformer"), id_dropout=0.5)
    model = session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), rngs=nnx.Rngs(0))
    content_part = model.content_projection(model.content[...])
    ids = model.id_embedding.embedding[...]
    table = model.item_table()
    # Each row is content alone (dropped) or content + the rescaled ID row (kept).
    dropped = np.all(np.isclose(table, content_part, atol=1e-6), axis=1)
    kept = np.all(np.isclose(table, content_part + ids / 0.5, atol=1e-6), axis=1)
    assert np.all(dropped | kept) and dropped.any() and kept.any()
    eval_table = nnx.view(model, deterministic=True).item_table()
    np.testing.assert_allclose(eval_table, content_part + ids, atol=1e-6)
    # ID-only models keep their IDs: dropping them would leave nothing to score with.
    id_only = session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(id_only.item_table(), id_only.id_embedding.embedding[...])


def test_shrunk_ids_count_in_proportion_to_their_train_clicks():
    """x_v = n_v / (n_v + k) E_id[v] + W c_v, against the hand-computed factors n / (n + 4)."""
    counts = np.array([0, 1, 4, 12, 2, 3, 4, 5, 6, 7, 8, 100])
    factors = np.array([0, 1 / 5, 1 / 2, 3 / 4, 2 / 6, 3 / 7, 1 / 2, 5 / 9, 6 / 10, 7 / 11, 8 / 12, 100 / 104])
    cfg = dataclasses.replace(_config("transformer"), id_shrinkage=4.0)
    model = session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), item_counts=counts, rngs=nnx.Rngs(0))
    content_part = np.asarray(model.content_projection(model.content[...]))
    ids = np.asarray(model.id_embedding.embedding[...])
    np.testing.assert_allclose(model.item_table(), content_part + factors[:, None] * ids, atol=1e-6)
    # An item never clicked in train is its content alone.
    np.testing.assert_allclose(model.item_table()[0], content_part[0], atol=1e-7)
    with pytest.raises(ValueError, match="train click counts"):
        session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), rngs=nnx.Rngs(0))
    # ID-only rows have nothing to shrink toward: their IDs stay whole.
    id_only = session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(id_only.item_table(), id_only.id_embedding.embedding[...])


def test_content_item_tower_and_item_bias_score_as_written():
    """id_embedding=False, item_bias: score(v) = h . W c_v + b_v, checked in numpy over the parts."""
    cfg = dataclasses.replace(_config("transformer"), id_embedding=False, item_bias=True)
    model = nnx.view(session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), rngs=nnx.Rngs(0)),
                     deterministic=True)
    assert model.id_embedding is None
    bias = np.linspace(-1.0, 1.0, NUM_ITEMS, dtype=np.float32)[:, None]
    model.item_bias[...] = jnp.asarray(bias)
    items, mask = _sessions()
    hidden = np.asarray(model.body(model.item_vectors()[items], items, mask))
    content_part = np.asarray(model.content_projection(model.content[...]))
    np.testing.assert_allclose(model.scores(items, mask), hidden @ content_part.T + bias.T, rtol=1e-5, atol=1e-5)
    # Every position of a whole session carries the bias's constant column.
    positions = np.asarray(model.position_vectors(items, mask))
    np.testing.assert_array_equal(positions[..., -1], 1.0)
    # The other parameters start as they would with the ID table (the table's draw is made either way).
    with_ids = session_encoders.SessionEncoder(_config("transformer"), NUM_ITEMS, _content(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model.content_projection.kernel[...], with_ids.content_projection.kernel[...])
    # The bias is trained (a Param); an ID-only row keeps its IDs whatever id_embedding says.
    assert isinstance(model.item_bias, nnx.Param)
    id_only = session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(0))
    assert id_only.id_embedding is not None and id_only.item_table().shape == (NUM_ITEMS, 17)


def test_content_is_frozen_not_a_parameter():
    model = _encoder("srgnn")
    params = nnx.state(model, nnx.Param)
    top_level = {path[0] for path, _ in nnx.to_flat_state(params)}
    assert "content" not in top_level
    assert "content_projection" in top_level
    assert isinstance(model.content, session_encoders.FrozenFeatures)


@pytest.mark.parametrize("chunk", [5, 12, 64])
def test_chunked_cross_entropy_equals_dense(chunk):
    key_vecs, key_table = jax.random.split(jax.random.key(3))
    session_vecs = jax.random.normal(key_vecs, (6, 8))
    table = jax.random.normal(key_table, (NUM_ITEMS, 8))
    targets = jnp.array([0, 11, 5, 5, 3, 7], jnp.int32)
    valid = jnp.array([True, True, False, True, True, True])

    def dense(vecs, tab):
        per_row = optax.softmax_cross_entropy_with_integer_labels(vecs @ tab.T, targets)
        return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.sum(valid)

    def chunked(vecs, tab):
        return session_encoders.chunked_softmax_cross_entropy(vecs, tab, targets, chunk, mask=valid)

    np.testing.assert_allclose(chunked(session_vecs, table), dense(session_vecs, table), rtol=1e-5)
    for got, expected in zip(
        jax.grad(chunked, argnums=(0, 1))(session_vecs, table),
        jax.grad(dense, argnums=(0, 1))(session_vecs, table),
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _toy_next_item_batch(key, batch=32, width=6):
    """Sessions walking the catalogue (v, v+1, ...); the target is the next item after the last click."""
    key_start, key_length = jax.random.split(key)
    start = jax.random.randint(key_start, (batch, 1), 0, NUM_ITEMS)
    length = jax.random.randint(key_length, (batch, 1), 2, width + 1)
    positions = jnp.arange(width)[None, :]
    mask = positions < length
    items = jnp.where(mask, (start + positions) % NUM_ITEMS, 0).astype(jnp.int32)
    targets = ((start[:, 0] + length[:, 0]) % NUM_ITEMS).astype(jnp.int32)
    return items, mask, targets


@pytest.mark.parametrize("encoder", ["transformer", "srgnn", "gru4rec"])
def test_training_steps_reduce_next_item_loss(encoder):
    model = session_encoders.SessionEncoder(_config(encoder, dropout=0.1), NUM_ITEMS, _content(), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(model, items, mask, targets):
        return session_encoders.chunked_softmax_cross_entropy(model(items, mask), model.item_table(), targets, 5)

    @nnx.jit
    def train_step(model, optimizer, items, mask, targets):
        loss, grads = nnx.value_and_grad(loss_fn)(model, items, mask, targets)
        optimizer.update(model, grads)
        return loss

    eval_batch = _toy_next_item_batch(jax.random.key(1000), batch=64)
    evaluate = nnx.jit(lambda m: loss_fn(nnx.view(m, deterministic=True), *eval_batch))
    initial = float(evaluate(model))
    for step in range(60):
        train_step(model, optimizer, *_toy_next_item_batch(jax.random.key(step)))
    final = float(evaluate(model))
    assert initial > 2.0  # about log 12 before training
    assert final < 0.5 * initial, (initial, final)


def test_encoder_config_reads_the_run_config():
    config = tpad_base.get_config("tiny")
    cfg = session_encoders.EncoderConfig.from_config(config)
    assert (cfg.encoder, cfg.hidden_dim, cfg.num_layers) == ("transformer", 32, 1)
    assert cfg.max_length == config.data.max_session_length
    with pytest.raises(ValueError, match="msbr.encoder"):
        session_encoders.EncoderConfig(encoder="lstm")


@pytest.mark.parametrize("encoder, causal", ALL_VARIANTS)
def test_last_item_similarity_adds_the_weighted_cosine_to_the_last_click(encoder, causal):
    raw = np.asarray(jax.random.normal(jax.random.key(5), (NUM_ITEMS, 7)))
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    plain = _encoder(encoder, causal)
    cfg = dataclasses.replace(_config(encoder, causal), last_item_similarity=True)
    model = nnx.view(session_encoders.SessionEncoder(cfg, NUM_ITEMS, _content(), unit, rngs=nnx.Rngs(0)),
                     deterministic=True)
    model.similarity_weight[...] = jnp.asarray(2.5)
    items, mask = _sessions()
    last = np.array([1, 2])  # the last clicks of the two sessions (items[0, 4], items[1, 2])
    cosine = (raw[last] @ raw.T) / np.outer(np.linalg.norm(raw[last], axis=1), np.linalg.norm(raw, axis=1))
    # Same seed, same draws for every other parameter: the difference is the similarity term alone.
    np.testing.assert_allclose(_scores(model, items, mask) - _scores(plain, items, mask), 2.5 * cosine,
                               rtol=1e-4, atol=1e-5)
    if cfg.reads_every_position:
        every = model.position_vectors(items, mask)
        table = model.item_table()
        for j in (0, 2):
            np.testing.assert_allclose(every[:, j] @ table.T, model.scores(items[:, :j + 1], mask[:, :j + 1]),
                                       rtol=1e-4, atol=1e-5)


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def _attention(x, attention, allowed):
    """Multi-head self-attention of x [S, d] with keys `allowed` [S, S] per query, from its weights."""
    q, k, v = (np.einsum("sd,dhk->shk", x, np.asarray(proj.kernel[...])) + np.asarray(proj.bias[...])
               for proj in (attention.query, attention.key, attention.value))
    logits = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads = np.einsum("hqs,shk->qhk", probs, v)
    return np.einsum("qhk,hkd->qd", heads, np.asarray(attention.out.kernel[...])) + np.asarray(attention.out.bias[...])


def _gelu(x):  # jax.nn.gelu's default tanh form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference_transformer(model, items, length, norm):
    """Session vector of the first `length` clicks, written from the GPT-2 (pre) and SASRec (post) formulas."""
    body = model.body
    x = np.asarray(model.id_embedding.embedding[...])[items[:length]] + np.asarray(body.positions.embedding[...])[:length]
    allowed = np.tril(np.ones((length, length), bool))
    if norm == "post":
        x = _layer_norm(x, body.input_norm)
    for block in body.blocks:
        mlp = lambda h, b=block: (_gelu(h @ np.asarray(b.mlp_in.kernel[...]) + np.asarray(b.mlp_in.bias[...]))
                                  @ np.asarray(b.mlp_out.kernel[...]) + np.asarray(b.mlp_out.bias[...]))
        if norm == "pre":
            x = x + _attention(_layer_norm(x, block.attention_norm), block.attention, allowed)
            x = x + mlp(_layer_norm(x, block.mlp_norm))
        else:
            x = _layer_norm(x + _attention(x, block.attention, allowed), block.attention_norm)
            x = _layer_norm(x + mlp(x), block.mlp_norm)
    if norm == "pre":
        x = _layer_norm(x, body.final_norm)
    return x[length - 1]


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_norm_placements_match_their_formulas(norm):
    cfg = dataclasses.replace(_config("transformer"), num_layers=2, transformer_norm=norm)
    model = nnx.view(session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(3)), deterministic=True)
    items, mask = _sessions()
    got = np.asarray(_session_vectors(model, items, mask))
    for row, length in enumerate(np.asarray(mask).sum(1)):
        want = _reference_transformer(model, np.asarray(items[row]), int(length), norm)
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="transformer_norm must be one of"):
        dataclasses.replace(cfg, transformer_norm="sandwich")


def test_attention_dropout_acts_in_training_only():
    cfg = dataclasses.replace(_config("transformer"), attention_dropout=0.5)
    model = session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(0))
    items, mask = _sessions()
    plain = session_encoders.SessionEncoder(dataclasses.replace(cfg, attention_dropout=0.0), NUM_ITEMS, None,
                                            rngs=nnx.Rngs(0))
    # Same weights; only the random streams differ, and the plain model keeps none in its attention.
    nnx.update(plain, nnx.state(model, nnx.Param))
    assert not [path for path, _ in nnx.to_flat_state(nnx.state(plain, nnx.RngState)) if "attention" in path]
    evaluated = _session_vectors(nnx.view(model, deterministic=True), items, mask)
    np.testing.assert_allclose(evaluated, _session_vectors(nnx.view(plain, deterministic=True), items, mask),
                               rtol=1e-5, atol=1e-6)
    # Training draws a fresh mask per call: two calls differ from each other and from evaluation.
    first, second = model(items, mask), model(items, mask)
    assert not np.allclose(first, second) and not np.allclose(first, evaluated)


def test_transformer_init_std_draws_the_dense_kernels_from_that_normal():
    def kernel_stds(std):
        cfg = dataclasses.replace(_config("transformer"), hidden_dim=64, transformer_init_std=std)
        block = session_encoders.SessionEncoder(cfg, NUM_ITEMS, None, rngs=nnx.Rngs(0)).body.blocks[0]
        kernels = (block.attention.query.kernel, block.attention.out.kernel, block.mlp_in.kernel, block.mlp_out.kernel)
        return [float(np.std(np.asarray(kernel[...]))) for kernel in kernels]

    np.testing.assert_allclose(kernel_stds(0.02), 0.02, rtol=0.1)
    # 0: flax's LeCun normal, std 1/sqrt(fan_in): 64 inputs everywhere but the MLP's output layer (256).
    np.testing.assert_allclose(kernel_stds(0.0), [1 / 8, 1 / 8, 1 / 8, 1 / 16], rtol=0.1)
