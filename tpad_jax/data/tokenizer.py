"""Tokenizer: a byte-level BPE trained on the catalogue, or a real checkpoint's tokenizer.json.

Token ids of the TPAD special tokens:
- trained BPE: `<pad> <bos> <eos> <image> <item> <sep>` are ids 0..5 in that order;
- a checkpoint's tokenizer (`data.tokenizer_path`): every id it already has is kept; each TPAD special
  token it lacks (matched by its exact text, e.g. `<pad>`) is appended after its last id, in the order
  above, so a checkpoint embedding table only grows at the end.
Always read the ids through `special_ids(tokenizer)`.
"""

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tpad_jax import layout

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<item>", "<sep>")
# The fixed words of the prompt layouts (prompts.py), so BPE learns them as whole tokens.
PROMPT_WORDS = ("Item:", "Category:", "Next:")
TOKENIZER_INPUTS = "tokenizer_inputs.json"  # what DIR/data/tokenizer.json was trained on


def train_tokenizer(texts, vocab_size, path):
    """Trains a byte-level BPE on `texts` plus the prompt words and saves it to `path`.

    Args:
      texts: iterable of strings (titles, categories).
      vocab_size: target vocabulary size, special tokens and the 256 byte symbols included.
      path: where tokenizer.json is written.
    Returns:
      The trained `tokenizers.Tokenizer`.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Prompts put every title, category and word after a space, except "Item:" that opens the text.
    prompt_lines = [" ".join(PROMPT_WORDS)] * 8 + [f" {word}" for word in PROMPT_WORDS] * 8
    tokenizer.train_from_iterator([*(f" {text}" for text in texts), *prompt_lines], trainer=trainer)
    _save(tokenizer, path)
    return tokenizer


def adopt_tokenizer(source_path, path):
    """Copies a checkpoint's tokenizer.json to `path`, appending the TPAD special tokens it lacks."""
    tokenizer = Tokenizer.from_file(str(source_path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    tokenizer.add_special_tokens(missing)
    _save(tokenizer, path)
    return tokenizer


def load_tokenizer(path):
    """Loads a tokenizer.json and checks that it has every TPAD special token."""
    tokenizer = Tokenizer.from_file(str(path))
    special_ids(tokenizer)
    return tokenizer


def special_ids(tokenizer):
    """Returns {special token text without brackets: id}, e.g. {"pad": 0, ..., "sep": 5}."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer lacks the special token {token!r}; build it with train_tokenizer "
                             "or adopt_tokenizer")
        ids[token.strip("<>")] = token_id
    return ids


def encode(tokenizer, texts):
    """Token ids of each text, without any special token the tokenizer's template would add."""
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


def tokenizer_for(config, data, workdir, source):
    """The run's tokenizer: DIR/data/tokenizer.json, made on first use.

    A checkpoint's tokenizer.json `source` is adopted (every call, it is cheap). Without one,
    DIR/data/tokenizer.json is loaded when DIR/data/tokenizer_inputs.json says it was trained on this
    prepared data (its fingerprint) with this vocab size; else a BPE is trained on the catalogue's titles
    and categories and both files are written.

    Args:
      config: the run config (`data.tokenizer_vocab_size`).
      data: the prepared data (unused when `source` is given).
      workdir: DIR.
      source: the tokenizer.json to adopt, `pretrained.tokenizer_source(config, workdir)`: the caller
        resolves it, as the checkpoints belong to the model code, which the input pipeline never imports.
    """
    path = Path(layout.tokenizer_file(workdir))
    if source:
        return adopt_tokenizer(source, path)
    trained_on = {"data_fingerprint": data.fingerprint, "vocab_size": config.data.tokenizer_vocab_size}
    inputs_path = path.with_name(TOKENIZER_INPUTS)
    if path.exists() and inputs_path.exists() and json.loads(inputs_path.read_text()) == trained_on:
        return load_tokenizer(path)
    texts = [*data.titles, *(category for category in data.categories if category)]
    tokenizer = train_tokenizer(texts, config.data.tokenizer_vocab_size, path)
    partial = inputs_path.with_name(f"{inputs_path.name}.tmp{os.getpid()}")
    partial.write_text(json.dumps(trained_on))
    os.replace(partial, inputs_path)
    return tokenizer


def _save(tokenizer, path):
    # Write then rename, so a reader (another process) never sees half a file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tokenizer.save(str(partial))
    os.replace(partial, path)
