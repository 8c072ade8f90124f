"""Grain input pipelines: item batches (stage 1, export) and session batches (stage 2).

Both read top to bottom: source -> (pad) -> shuffle -> repeat -> this process's slice -> map to one
example -> batch -> iterator -> multiprocess prefetch. The returned iterators have
`get_state()`/`set_state()`, so the training checkpoint can hold the input position.

Without `repeat` the source is padded with copies of record 0 marked `valid=False` (and an all-False
`loss_mask`) up to a multiple of batch_size * process_count: every record appears exactly once, every
batch is full and every process gets the same number of batches.
"""

import dataclasses

import grain
import jax
import numpy as np
from PIL import Image

from tpad_jax.data import prompts, tfds_builder, tokenizer as tokenizer_lib


def item_batches(config, data, tokenizer, n_img, batch_size, *, shuffle, repeat, seed,
                 process_index=None, process_count=None):
    """Iterator over item batches (docs/architecture.md §2), read from the TFDS item table.

    Args:
      config: the run config (data.* keys).
      data: a PreparedData (needs `workdir` to find DIR/data/tfds/).
      tokenizer: from tokenizer.py.
      n_img: image slots per item prompt (visual tokens of one image).
      batch_size: rows per batch on this process.
      shuffle, repeat, seed: training order (reshuffled every epoch) or one pass in row order.
      process_index, process_count: this process's slice; default jax.process_index()/process_count().
    """
    titles, categories = _item_texts(data, tokenizer)
    to_example = ItemExample(vocab=prompts.prompt_vocab(tokenizer), titles=titles, categories=categories,
                             n_img=n_img, max_item_tokens=config.data.max_item_tokens,
                             image_size=config.data.image_size)
    source = tfds_builder.item_table(data, data.workdir)
    return _batches(config, source, to_example, batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                    process_index=process_index, process_count=process_count)


def session_batches(config, data, tokenizer, split, batch_size, *, shuffle, repeat, seed,
                    process_index=None, process_count=None):
    """Iterator over session batches (docs/architecture.md §2).

    `split="train"` gives one example per position j >= 1 of every train session (prefix session[:j],
    target session[j]); other splits give `data.examples(split)`. Other arguments as `item_batches`.
    """
    titles, _ = _item_texts(data, tokenizer)
    to_example = SessionExample(vocab=prompts.prompt_vocab(tokenizer), titles=titles,
                                has_image=np.asarray(data.has_image, bool),
                                m=config.data.visual_tokens_per_item,
                                max_title_tokens=config.data.max_title_tokens,
                                max_prompt_items=config.data.max_prompt_items)
    source = SessionExamples.every_position(data.train) if split == "train" else (
        SessionExamples.from_prefixes(*data.examples(split)))
    return _batches(config, source, to_example, batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                    process_index=process_index, process_count=process_count)


def item_row_batches(config, num_items, batch_size, *, shuffle, repeat, seed, process_index=None,
                     process_count=None):
    """Iterator over batches of item rows ({rows, valid}) when prompts and pixels live on device."""
    return _batches(config, np.arange(num_items, dtype=np.int32), RowExample(), batch_size, shuffle=shuffle,
                    repeat=repeat, seed=seed, process_index=process_index, process_count=process_count)


def item_prompt_table(config, data, tokenizer, n_img):
    """Every item's prompt (tokens, attention_mask, loss_mask, item_pos), stacked by row."""
    titles, categories = _item_texts(data, tokenizer)
    vocab = prompts.prompt_vocab(tokenizer)
    rows = [prompts.item_prompt(vocab, titles[row], categories[row], bool(data.has_image[row]), n_img=n_img,
                                max_item_tokens=config.data.max_item_tokens) for row in range(data.num_items)]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def item_pixel_table(config, data):
    """Every item's image, decoded once from the TFDS item table, for device-side lookup.

    Returns:
      pixels float32 [N, H, W, 3] in [-1, 1] (zeros for items without image) and has_image bool [N].
    """
    source = tfds_builder.item_table(data, data.workdir)
    size = config.data.image_size
    pixels = np.zeros((data.num_items, size, size, 3), np.float32)
    has_image = np.zeros(data.num_items, bool)
    for row in range(data.num_items):
        record = source[row]
        has_image[row] = record["has_image"]
        if has_image[row]:
            pixels[row] = to_pixels(record["image"], size)
    return pixels, has_image


def to_pixels(image, size):
    """uint8 [h, w, 3] -> float32 [size, size, 3] in [-1, 1] (bicubic resize, aspect not kept)."""
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class RowExample:
    """Maps (row, valid) to {rows, valid} (a picklable grain map)."""

    def __call__(self, row_and_valid):
        row, valid = row_and_valid
        return dict(rows=np.int32(row), valid=np.bool_(valid))


@dataclasses.dataclass(frozen=True)
class ItemExample:
    """Maps (TFDS item record, valid) to one item example (a picklable grain map)."""

    vocab: prompts.PromptVocab
    titles: list
    categories: list
    n_img: int
    max_item_tokens: int
    image_size: int

    def __call__(self, record_and_valid):
        record, valid = record_and_valid
        row = int(record["row"])
        has_image = bool(record["has_image"])
        prompt = prompts.item_prompt(self.vocab, self.titles[row], self.categories[row], has_image,
                                     n_img=self.n_img, max_item_tokens=self.max_item_tokens)
        size = self.image_size
        pixels = to_pixels(record["image"], size) if has_image else np.zeros((size, size, 3), np.float32)
        return dict(rows=np.int32(row), pixels=pixels, has_image=np.bool_(has_image),
                    tokens=prompt["tokens"], attention_mask=prompt["attention_mask"],
                    loss_mask=prompt["loss_mask"] & valid, item_pos=prompt["item_pos"],
                    valid=np.bool_(valid))


@dataclasses.dataclass(frozen=True)
class SessionExample:
    """Maps ((prefix rows, target row), valid) to one session example (a picklable grain map)."""

    vocab: prompts.PromptVocab
    titles: list
    has_image: np.ndarray
    m: int
    max_title_tokens: int
    max_prompt_items: int

    def __call__(self, example_and_valid):
        (prefix, target), valid = example_and_valid
        shown = prefix[-self.max_prompt_items:]
        count = len(shown)
        prompt = prompts.session_prompt(self.vocab, [self.titles[row] for row in shown],
                                        self.has_image[shown], self.titles[target], m=self.m,
                                        max_title_tokens=self.max_title_tokens,
                                        max_prompt_items=self.max_prompt_items)
        rows = np.zeros(self.max_prompt_items, np.int32)
        rows[:count] = shown
        next_rows = np.zeros(self.max_prompt_items, np.int32)
        next_rows[:count] = np.append(prefix[len(prefix) - count + 1:], target)
        return dict(rows=rows, row_mask=np.arange(self.max_prompt_items) < count, next_rows=next_rows,
                    tokens=prompt["tokens"], attention_mask=prompt["attention_mask"],
                    loss_mask=prompt["loss_mask"] & valid, sep_pos=prompt["sep_pos"],
                    image_slot_rows=prompt["image_slot_rows"], target=np.int32(target),
                    valid=np.bool_(valid))


@dataclasses.dataclass(frozen=True)
class SessionExamples:
    """Random-access (prefix rows, target row) examples stored as slices of one flat row array."""

    flat_rows: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray

    @classmethod
    def every_position(cls, sessions):
        """One example per position j >= 1 of each session: (session[:j], session[j])."""
        flat_rows = _concatenate(sessions)
        offsets = np.cumsum([0] + [len(s) for s in sessions])
        pairs = [(offset, j) for offset, s in zip(offsets, sessions) for j in range(1, len(s))]
        starts, lengths = np.array(pairs, np.int64).reshape(-1, 2).T
        return cls(flat_rows, starts, lengths, flat_rows[starts + lengths])

    @classmethod
    def from_prefixes(cls, prefixes, targets):
        """Examples from explicit prefixes and targets (PreparedData.examples)."""
        lengths = np.array([len(p) for p in prefixes], np.int64)
        return cls(_concatenate(prefixes), np.cumsum(lengths) - lengths, lengths,
                   np.asarray(targets, np.int32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        start = self.starts[index]
        return self.flat_rows[start:start + self.lengths[index]], int(self.targets[index])


@dataclasses.dataclass(frozen=True)
class PaddedSource:
    """Pairs each record with valid=True; indices past the source give (record 0, False)."""

    source: object
    length: int

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if index < len(self.source):
            return self.source[index], True
        return self.source[0], False


def _batches(config, source, to_example, batch_size, *, shuffle, repeat, seed, process_index,
             process_count):
    """The shared chain from a random-access source to a checkpointable batch iterator."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if len(source) == 0:
        raise ValueError("the pipeline's source is empty")
    per_step = batch_size * process_count
    length = len(source) if repeat else -(-len(source) // per_step) * per_step
    dataset = grain.MapDataset.source(PaddedSource(source, length))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset[process_index::process_count]
    dataset = dataset.map(to_example)
    dataset = dataset.batch(batch_size, drop_remainder=repeat)
    # Prefetch a few batches only: the default buffer (500 elements) would hold 500 batches of pixels.
    threads = config.data.read_threads
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    iterable = dataset.to_iter_dataset(read_options)
    if config.data.worker_count > 0:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
    return iter(iterable)


def _concatenate(row_lists):
    return np.concatenate([np.zeros(0, np.int32)] + [np.asarray(rows, np.int32) for rows in row_lists])


def _item_texts(data, tokenizer):
    """Token ids of every item's title and category as written in prompts ([] when no category)."""
    titles = tokenizer_lib.encode(tokenizer, [prompts.title_text(title) for title in data.titles])
    categories = tokenizer_lib.encode(
        tokenizer, [prompts.title_text(category) if category else "" for category in data.categories])
    return titles, categories
