"""Prompt layouts checked token by token against hand-written layouts."""

import numpy as np
import pytest

from tpad_jax.data import prompts, tokenizer as tokenizer_lib

# Hand-picked ids: specials 0..5, words in the 90s, title/category tokens from 10 up.
PAD, BOS, EOS, IMG, ITEM, SEP = range(6)
ITEM_W, CAT_W, NEXT_W, COLON, DOT = 91, 92, 93, 94, 95
VOCAB = prompts.PromptVocab(pad=PAD, bos=BOS, eos=EOS, image=IMG, item=ITEM, sep=SEP,
                            item_word=(ITEM_W, COLON), category_word=(CAT_W, COLON),
                            next_word=(NEXT_W, COLON), period=(DOT,))


def test_item_prompt_layout_and_masks():
    out = prompts.item_prompt(VOCAB, [10, 11], [20], True, n_img=2, max_item_tokens=10)
    expected = [BOS, IMG, IMG, ITEM_W, COLON, 10, 11, DOT, CAT_W, COLON, 20, DOT, ITEM, PAD]
    assert out["tokens"].tolist() == expected
    assert prompts.item_prompt_length(2, 10) == len(expected)
    assert out["item_pos"] == 12
    assert out["attention_mask"].tolist() == [True] * 13 + [False]
    # Targets are the title (positions 5, 6) and the category (10); the mask sits one step before.
    assert np.flatnonzero(out["loss_mask"]).tolist() == [4, 5, 9]


def test_item_prompt_without_image_or_category():
    out = prompts.item_prompt(VOCAB, [10], [], False, n_img=3, max_item_tokens=6)
    assert out["tokens"].tolist() == [BOS, IMG, IMG, IMG, ITEM_W, COLON, 10, DOT, ITEM, PAD, PAD]
    assert out["attention_mask"].tolist() == [True, False, False, False, True, True, True, True, True,
                                              False, False]
    assert np.flatnonzero(out["loss_mask"]).tolist() == [5]
    assert out["item_pos"] == 8


def test_item_prompt_cuts_title_then_category():
    title, category = list(range(10, 16)), list(range(20, 24))
    # Budget 10: words take 6, so title (6) + category (4) must lose 6: title down to 1, category to 3.
    out = prompts.item_prompt(VOCAB, title, category, True, n_img=0, max_item_tokens=10)
    assert out["tokens"].tolist() == [BOS, ITEM_W, COLON, 10, DOT, CAT_W, COLON, 20, 21, 22, DOT, ITEM]
    # Budget 13: only the title is cut, to 3 tokens.
    out = prompts.item_prompt(VOCAB, title, category, True, n_img=0, max_item_tokens=13)
    assert out["tokens"][3:7].tolist() == [10, 11, 12, DOT] and out["tokens"][9:13].tolist() == category
    with pytest.raises(ValueError, match="max_item_tokens"):
        prompts.item_prompt(VOCAB, title, category, True, n_img=0, max_item_tokens=6)


def test_session_prompt_layout_and_positions():
    out = prompts.session_prompt(VOCAB, [[10, 11, 12], [13]], [True, False], [30, 31, 32], m=2,
                                 max_title_tokens=2, max_prompt_items=3)
    expected = [IMG, IMG, 10, 11, SEP,
                IMG, IMG, 13, SEP,
                NEXT_W, COLON, 30, 31, EOS]
    length = prompts.session_prompt_length(VOCAB, m=2, max_title_tokens=2, max_prompt_items=3)
    assert length == 3 * (2 + 2 + 1) + 2 + 2 + 1 == 20
    assert out["tokens"].tolist() == expected + [PAD] * (length - len(expected))
    assert out["attention_mask"].tolist() == ([True] * 5 + [False, False] + [True] * 7
                                              + [False] * (length - len(expected)))
    # Targets are the next title (positions 11, 12) and its <eos> (13); the mask sits one step before.
    assert np.flatnonzero(out["loss_mask"]).tolist() == [10, 11, 12]
    assert out["sep_pos"].tolist() == [4, 8, 0]
    assert out["image_slot_rows"].tolist() == [0, 0, 1, 1, 0, 0]


def test_session_prompt_rejects_too_many_items():
    with pytest.raises(ValueError, match="1..2 items"):
        prompts.session_prompt(VOCAB, [[10]] * 3, [True] * 3, [30], m=1, max_title_tokens=2,
                               max_prompt_items=2)


def test_prompt_text_matches_tokenizing_the_whole_sentence(tmp_path):
    titles = ["Red cotton shirt", "Blue wool scarf", "Toy Story (1995)", "Green leather boots"] * 5
    tokenizer = tokenizer_lib.train_tokenizer(titles + ["tops", "shoes"], 320, tmp_path / "tok.json")
    vocab = prompts.prompt_vocab(tokenizer)
    title, category = tokenizer_lib.encode(tokenizer, [prompts.title_text("Red cotton shirt"),
                                                       prompts.title_text("tops")])
    out = prompts.item_prompt(vocab, title, category, True, n_img=1, max_item_tokens=40)
    text_ids = out["tokens"][2:out["item_pos"]].tolist()
    whole = tokenizer.encode("Item: Red cotton shirt. Category: tops.", add_special_tokens=False).ids
    assert text_ids == whole
    assert tokenizer.decode(out["tokens"][:out["item_pos"] + 1].tolist(), skip_special_tokens=False) == (
        "<bos><image>Item: Red cotton shirt. Category: tops.<item>")
