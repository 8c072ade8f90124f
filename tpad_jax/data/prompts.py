"""The prompt layouts, as pure functions over token id lists (the only place they are written down).

Item prompt (stage 1, export), right-padded to `item_prompt_length`:

    <bos> <image>*n_img Item: {title}. Category: {category}. <item> <pad>...

(" Category: {category}." is left out when the item has no category.) The loss is on the title and
category tokens; the item representation is read at `<item>`. When the text does not fit in
`max_item_tokens`, the title is cut first (down to one token), then the category.

Session prompt (stage 2), right-padded to `session_prompt_length`:

    <image>*m {title_1} <sep> ... <image>*m {title_k} <sep> Next: {next title} <eos> <pad>...

for the k <= max_prompt_items items shown, each title cut to `max_title_tokens`. The loss is on the
next title and the `<eos>` that closes it (the model learns where a title ends).

Masks follow docs/architecture.md §2: `loss_mask[t]` is True where token t+1 is a target;
`attention_mask` is False on padding and on the image slots of items without an image.
"""

import dataclasses

import numpy as np

from tpad_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class PromptVocab:
    """The token ids the layouts are written in."""

    pad: int
    bos: int
    eos: int
    image: int
    item: int
    sep: int
    item_word: tuple[int, ...]  # "Item:" (opens the text, no space before it)
    category_word: tuple[int, ...]  # " Category:"
    next_word: tuple[int, ...]  # " Next:"
    period: tuple[int, ...]  # "."


def prompt_vocab(tokenizer):
    """The `PromptVocab` of a tokenizer made by tokenizer.py."""
    words = tokenizer_lib.encode(tokenizer, ["Item:", " Category:", " Next:", "."])
    return PromptVocab(**tokenizer_lib.special_ids(tokenizer), item_word=tuple(words[0]),
                       category_word=tuple(words[1]), next_word=tuple(words[2]), period=tuple(words[3]))


def title_text(title):
    """How a title or category is written inside a prompt: after a space (tokenize this)."""
    return f" {title}"


def item_prompt_length(n_img, max_item_tokens):
    """Length L of every item prompt: <bos>, image slots, text budget, <item>."""
    return 1 + n_img + max_item_tokens + 1


def session_prompt_length(vocab, m, max_title_tokens, max_prompt_items):
    """Length L of every session prompt: the shown items, then " Next: {next title} <eos>"."""
    return max_prompt_items * (m + max_title_tokens + 1) + len(vocab.next_word) + max_title_tokens + 1


def item_prompt(vocab, title, category, has_image, *, n_img, max_item_tokens):
    """Builds one item prompt.

    Args:
      vocab: a `PromptVocab`.
      title: token ids of `title_text(title)`.
      category: token ids of `title_text(category)`; empty when the item has none.
      has_image: False masks the image slots out of attention.
      n_img: number of image slots (visual tokens the vision encoder gives per image).
      max_item_tokens: text budget between the image slots and <item>.
    Returns:
      dict with tokens int32 [L], attention_mask bool [L], loss_mask bool [L], item_pos int32 scalar.
    """
    title, category = _fit_item_text(vocab, list(title), list(category), max_item_tokens)
    segments = [([vocab.bos], False, True), ([vocab.image] * n_img, False, has_image),
                (vocab.item_word, False, True), (title, True, True), (vocab.period, False, True)]
    if category:
        segments += [(vocab.category_word, False, True), (category, True, True), (vocab.period, False, True)]
    segments.append(([vocab.item], False, True))
    tokens, attention_mask, loss_mask, starts = _assemble(
        segments, item_prompt_length(n_img, max_item_tokens), vocab.pad)
    return dict(tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask,
                item_pos=np.int32(starts[-1]))


def session_prompt(vocab, titles, has_image, next_title, *, m, max_title_tokens, max_prompt_items):
    """Builds one session prompt.

    Args:
      vocab: a `PromptVocab`.
      titles: token ids of `title_text(title)` of each shown item, oldest first (1..max_prompt_items).
      has_image: bool per shown item; False masks its image slots out of attention.
      next_title: token ids of the next item's title (the generation target).
      m: image slots per shown item.
      max_title_tokens: every title is cut to this many tokens.
      max_prompt_items: S, the most items a prompt shows.
    Returns:
      dict with tokens int32 [L], attention_mask bool [L], loss_mask bool [L], sep_pos int32 [S]
      (0 where no item is shown), image_slot_rows int32 [S*m] (the shown item of each image slot, in
      order; 0 past the last slot).
    """
    if not 1 <= len(titles) <= max_prompt_items or len(has_image) != len(titles):
        raise ValueError(f"a session prompt shows 1..{max_prompt_items} items with one has_image each; "
                         f"got {len(titles)} titles and {len(has_image)} has_image")
    segments = []
    for title, visible in zip(titles, has_image):
        segments += [([vocab.image] * m, False, bool(visible)), (list(title)[:max_title_tokens], False, True),
                     ([vocab.sep], False, True)]
    segments += [(vocab.next_word, False, True), (list(next_title)[:max_title_tokens], True, True),
                 ([vocab.eos], True, True)]
    length = session_prompt_length(vocab, m, max_title_tokens, max_prompt_items)
    tokens, attention_mask, loss_mask, starts = _assemble(segments, length, vocab.pad)
    sep_pos = np.zeros(max_prompt_items, np.int32)
    sep_pos[:len(titles)] = starts[2:3 * len(titles):3]
    image_slot_rows = np.zeros(max_prompt_items * m, np.int32)
    image_slot_rows[:len(titles) * m] = np.repeat(np.arange(len(titles)), m)
    return dict(tokens=tokens, attention_mask=attention_mask, loss_mask=loss_mask, sep_pos=sep_pos,
                image_slot_rows=image_slot_rows)


def _fit_item_text(vocab, title, category, max_item_tokens):
    """Cuts the title (to >= 1 token), then the category, until the item text fits its budget."""
    fixed = len(vocab.item_word) + len(vocab.period)
    if category:
        fixed += len(vocab.category_word) + len(vocab.period)
    overflow = fixed + len(title) + len(category) - max_item_tokens
    title_cut = min(max(overflow, 0), max(len(title) - 1, 0))
    title = title[:len(title) - title_cut]
    overflow -= title_cut
    if overflow > 0:
        if len(category) <= overflow:
            raise ValueError(f"max_item_tokens={max_item_tokens} cannot hold the prompt words and one token "
                             "each of title and category")
        category = category[:len(category) - overflow]
    return title, category


def _assemble(segments, length, pad):
    """Concatenates (ids, is_target, attend) segments and right-pads them to `length`.

    Returns:
      tokens int32 [length], attention_mask bool [length], loss_mask bool [length] (token t+1 is a
      target), and the start position of every segment.
    """
    tokens = np.full(length, pad, np.int32)
    attention_mask = np.zeros(length, bool)
    is_target = np.zeros(length + 1, bool)
    starts = []
    position = 0
    for ids, target, attend in segments:
        end = position + len(ids)
        if end > length:
            raise ValueError(f"prompt needs more than its {length} positions")
        tokens[position:end] = ids
        attention_mask[position:end] = attend
        is_target[position:end] = target
        starts.append(position)
        position = end
    return tokens, attention_mask, is_target[1:].copy(), starts
