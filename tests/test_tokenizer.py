"""Tokenizer: trained byte-level BPE, adopted checkpoint tokenizers, and the workdir file."""

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tpad_jax.data import tokenizer as tokenizer_lib

TITLES = ["Red cotton shirt", "Blue wool scarf", "Toy Story (1995)", "Green leather boots",
          "Striped linen dress"] * 4
CATEGORIES = ["tops", "accessories", "Animation", "shoes", "dresses"]


def test_trained_tokenizer_specials_round_trip_and_reload(tmp_path):
    path = tmp_path / "data" / "tokenizer.json"
    tokenizer = tokenizer_lib.train_tokenizer(TITLES + CATEGORIES, 400, path)
    assert tokenizer_lib.special_ids(tokenizer) == {"pad": 0, "bos": 1, "eos": 2, "image": 3, "item": 4,
                                                    "sep": 5}
    assert tokenizer.get_vocab_size() <= 400
    # Byte-level: any text, seen or not, decodes back exactly.
    texts = [" Red cotton shirt", "Item: Toy Story (1995). Category: Animation.", " Ünïcode ☃ 42"]
    for text, ids in zip(texts, tokenizer_lib.encode(tokenizer, texts)):
        assert tokenizer.decode(ids) == text
    # Words seen in training become single tokens; the prompt words are learned too.
    assert len(tokenizer_lib.encode(tokenizer, [" cotton"])[0]) == 1
    word_ids = tokenizer_lib.encode(tokenizer, ["Item:", " Category:", " Next:"])
    assert [len(ids) for ids in word_ids] == [2, 2, 2]
    reloaded = tokenizer_lib.load_tokenizer(path)
    assert tokenizer_lib.encode(reloaded, texts) == tokenizer_lib.encode(tokenizer, texts)
    assert tokenizer.encode("<sep><image>", add_special_tokens=False).ids == [5, 3]


def _checkpoint_tokenizer(path):
    """A stand-in for a real checkpoint's tokenizer.json: its own specials, <pad> among them."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TITLES, trainer=trainer)
    tokenizer.save(str(path))
    return tokenizer


def test_adopt_keeps_checkpoint_ids_and_appends_missing_specials(tmp_path):
    original = _checkpoint_tokenizer(tmp_path / "ckpt.json")
    size = original.get_vocab_size()
    adopted = tokenizer_lib.adopt_tokenizer(tmp_path / "ckpt.json", tmp_path / "data" / "tokenizer.json")
    vocab = adopted.get_vocab()
    assert all(vocab[token] == token_id for token, token_id in original.get_vocab().items())
    assert tokenizer_lib.special_ids(adopted) == {"pad": 3, "bos": size, "eos": size + 1,
                                                  "image": size + 2, "item": size + 3, "sep": size + 4}
    assert adopted.encode(" Blue wool scarf").ids == original.encode(" Blue wool scarf").ids
    reloaded = tokenizer_lib.load_tokenizer(tmp_path / "data" / "tokenizer.json")
    assert tokenizer_lib.special_ids(reloaded) == tokenizer_lib.special_ids(adopted)


def test_load_rejects_a_tokenizer_without_tpad_specials(tmp_path):
    _checkpoint_tokenizer(tmp_path / "ckpt.json")
    with pytest.raises(ValueError, match="<bos>"):
        tokenizer_lib.load_tokenizer(tmp_path / "ckpt.json")


def test_tokenizer_for_trains_once_then_loads_or_adopts(tmp_path):
    config = SimpleNamespace(data=SimpleNamespace(tokenizer_vocab_size=300))
    data = SimpleNamespace(titles=TITLES, categories=CATEGORIES + [None], fingerprint="f1")
    trained = tokenizer_lib.tokenizer_for(config, data, tmp_path, None)
    path = tmp_path / "data" / "tokenizer.json"
    assert path.exists()
    # The same prepared data loads the file (here: its stand-in's titles changed, its fingerprint not).
    same = SimpleNamespace(titles=["Completely different words"], categories=[None], fingerprint="f1")
    assert tokenizer_lib.tokenizer_for(config, same, tmp_path, None).get_vocab() == trained.get_vocab()
    # Other prepared data, or another vocab size, trains it again: never a tokenizer of other titles.
    other = SimpleNamespace(titles=["Completely different words"], categories=[None], fingerprint="f2")
    assert tokenizer_lib.tokenizer_for(config, other, tmp_path, None).get_vocab() != trained.get_vocab()
    assert tokenizer_lib.tokenizer_for(config, data, tmp_path, None).get_vocab() == trained.get_vocab()
    _checkpoint_tokenizer(tmp_path / "ckpt.json")
    adopted = tokenizer_lib.tokenizer_for(config, data, tmp_path, str(tmp_path / "ckpt.json"))
    assert tokenizer_lib.special_ids(adopted)["pad"] == 3
    assert tokenizer_lib.special_ids(tokenizer_lib.load_tokenizer(path))["pad"] == 3
