"""Grain input pipelines: item batches (the frozen ViT's pass over the catalogue's pictures), item-row
batches (stage 1) and session batches (stage 2).

Both read top to bottom: example positions -> shuffle -> repeat -> this process's slice -> batch of
positions -> map to one batch -> iterator -> multiprocess prefetch. Grain moves positions only and each
batch is assembled in one call (gathered with numpy where the layout allows): Grain's bookkeeping per
element cost more than building most examples. The returned iterators have `get_state()`/`set_state()`,
so the training checkpoint can hold the input position.

Without `repeat` the positions run past the source up to a multiple of batch_size * process_count; those
give copies of record 0 marked `valid=False` (with an all-False `loss_mask`): every record appears
exactly once, every batch is full and every process gets the same number of batches.
"""

import dataclasses

import grain
from absl import flags
import jax
import numpy as np
from PIL import Image

from tpad_jax.data import prepared, prompts, tfds_builder, tokenizer as tokenizer_lib

# Arrays smaller than this travel from Grain workers pickled, larger ones (pixels) in shared memory.
MIN_SHARED_MEMORY_BYTES = 1 << 20


def item_batches(config, data, tokenizer, n_img, batch_size, *, shuffle, repeat, seed,
                 process_index=None, process_count=None, prompts=None, rows=None):
    """Iterator over item batches (docs/architecture.md §2), images read from the TFDS item table.

    Args:
      config: the run config (data.* keys).
      data: a PreparedData (needs `workdir` to find DIR/data/tfds/).
      tokenizer: from tokenizer.py.
      n_img: image slots per item prompt (visual tokens of one image).
      batch_size: rows per batch on this process.
      shuffle, repeat, seed: training order (reshuffled every epoch) or one pass in row order.
      process_index, process_count: this process's slice; default jax.process_index()/process_count().
      prompts: the `item_prompt_table` when the caller has it already (else built here).
      rows: only these item rows (int array; the batches' `rows` say which), else all of them.
    """
    prompts = item_prompt_table(config, data, tokenizer, n_img) if prompts is None else prompts
    to_batch = ItemBatch(source=tfds_builder.item_table(data, data.workdir), prompts=prompts,
                         image_size=config.data.image_size, rows=None if rows is None else np.asarray(rows))
    return _batches(config, to_batch, batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                    process_index=process_index, process_count=process_count)


def session_batches(config, data, tokenizer, split, batch_size, *, shuffle, repeat, seed,
                    process_index=None, process_count=None):
    """Iterator over session batches (docs/architecture.md §2).

    `split="train"` gives one example per position j >= 1 of every train session (prefix session[:j],
    target session[j]); other splits give `data.examples(split)`. Other arguments as `item_batches`.
    """
    titles, _ = _item_texts(data, tokenizer)
    examples = SessionExamples.every_position(data.train) if split == "train" else (
        SessionExamples.from_prefixes(*data.examples(split)))
    to_batch = SessionBatch(examples=examples, vocab=prompts.prompt_vocab(tokenizer), titles=titles,
                            has_image=np.asarray(data.has_image, bool),
                            m=config.data.visual_tokens_per_item,
                            max_title_tokens=config.data.max_title_tokens,
                            max_prompt_items=config.data.max_prompt_items)
    return _batches(config, to_batch, batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                    process_index=process_index, process_count=process_count)


def item_row_batches(config, num_items, batch_size, *, shuffle, repeat, seed, process_index=None,
                     process_count=None):
    """Iterator over batches of item rows ({rows, valid}) when prompts and pixels live on device."""
    return _batches(config, RowBatch(num_items), batch_size, shuffle=shuffle, repeat=repeat, seed=seed,
                    process_index=process_index, process_count=process_count)


def item_prompt_table(config, data, tokenizer, n_img):
    """Every item's prompt (tokens, attention_mask, loss_mask, item_pos), stacked by row."""
    titles, categories = _item_texts(data, tokenizer)
    vocab = prompts.prompt_vocab(tokenizer)
    rows = [prompts.item_prompt(vocab, titles[row], categories[row], bool(data.has_image[row]), n_img=n_img,
                                max_item_tokens=config.data.max_item_tokens) for row in range(data.num_items)]
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def to_pixels(image, size):
    """uint8 [h, w, 3] -> float32 [size, size, 3] in [-1, 1] (bicubic resize, aspect not kept)."""
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class RowBatch:
    """Maps positions [B] to {rows, valid} (a picklable grain map)."""

    num_items: int

    def __len__(self):
        return self.num_items

    def __call__(self, positions):
        rows, valid = _index_and_valid(positions, self.num_items)
        return dict(rows=rows, valid=valid)


@dataclasses.dataclass(frozen=True)
class ItemBatch:
    """Maps positions [B] to an item batch: prompts gathered from the table, images decoded per item."""

    source: object  # the TFDS item table: record i is item row i
    prompts: dict  # item_prompt_table
    image_size: int
    rows: np.ndarray | None = None  # the item rows to read, in order (None: every row)

    def __len__(self):
        return len(self.source) if self.rows is None else len(self.rows)

    def __call__(self, positions):
        rows, valid = _index_and_valid(positions, len(self))
        rows = rows if self.rows is None else self.rows[rows].astype(np.int32)
        # One batched read: ArrayRecord reads a record alone at about 3 ms in a 1M-item table (each
        # single read starts its own read-ahead), a batch at about 15 us a record.
        records = self.source.__getitems__(rows.tolist())
        has_image = np.array([record["has_image"] for record in records], bool)
        size = self.image_size
        pixels = np.zeros((len(rows), size, size, 3), np.float32)
        for i in np.flatnonzero(has_image):
            pixels[i] = to_pixels(records[i]["image"], size)
        prompt = {name: values[rows] for name, values in self.prompts.items()}
        return dict(rows=rows, pixels=pixels, has_image=has_image, tokens=prompt["tokens"],
                    attention_mask=prompt["attention_mask"], loss_mask=prompt["loss_mask"] & valid[:, None],
                    item_pos=prompt["item_pos"], valid=valid)


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
        flat_rows, session_lengths = _concatenate(sessions)
        offsets = np.cumsum(session_lengths) - session_lengths
        per_session = np.maximum(session_lengths - 1, 0)
        # Example k of a session starts at its first click and shows k + 1 clicks (arrays, not a Python
        # pair per click).
        first = np.cumsum(per_session) - per_session
        lengths = np.arange(int(per_session.sum()), dtype=np.int64) - np.repeat(first, per_session) + 1
        starts = np.repeat(offsets, per_session)
        return cls(flat_rows, starts, lengths, flat_rows[starts + lengths])

    @classmethod
    def from_prefixes(cls, prefixes, targets):
        """Examples from explicit prefixes and targets (PreparedData.examples)."""
        flat_rows, lengths = _concatenate(prefixes)
        return cls(flat_rows, np.cumsum(lengths) - lengths, lengths, np.asarray(targets, np.int32))

    def __len__(self):
        return len(self.targets)

    def last_items(self, index, size):
        """The last `size` prefix items of examples `index`, left-aligned, and the item after each.

        Returns:
          rows int32 [b, size] (0 past the shown items), their mask bool [b, size], and next_rows
          int32 [b, size]: the following prefix item, the target after the last shown item, 0 after it.
        """
        lengths = self.lengths[index]
        count = np.minimum(lengths, size)[:, None]
        slot = np.arange(size)
        mask = slot < count
        flat_index = (self.starts[index] + lengths)[:, None] - count + slot
        rows = np.where(mask, self.flat_rows[np.where(mask, flat_index, 0)], 0).astype(np.int32)
        following = np.concatenate([rows[:, 1:], np.zeros_like(rows[:, :1])], axis=1)
        next_rows = np.where(slot == count - 1, self.targets[index][:, None], following).astype(np.int32)
        return rows, mask, next_rows


@dataclasses.dataclass(frozen=True)
class SessionBatch:
    """Maps positions [B] to a session batch: shown rows gathered at once, one prompt per example."""

    examples: SessionExamples
    vocab: prompts.PromptVocab
    titles: list
    has_image: np.ndarray
    m: int
    max_title_tokens: int
    max_prompt_items: int

    def __len__(self):
        return len(self.examples)

    def __call__(self, positions):
        index, valid = _index_and_valid(positions, len(self.examples))
        rows, row_mask, next_rows = self.examples.last_items(index, self.max_prompt_items)
        targets = self.examples.targets[index].astype(np.int32)
        built = [self._prompt(shown[mask], target) for shown, mask, target in zip(rows, row_mask, targets)]
        prompt = {name: np.stack([example[name] for example in built]) for name in built[0]}
        return dict(rows=rows, row_mask=row_mask, next_rows=next_rows, tokens=prompt["tokens"],
                    attention_mask=prompt["attention_mask"], loss_mask=prompt["loss_mask"] & valid[:, None],
                    sep_pos=prompt["sep_pos"], image_slot_rows=prompt["image_slot_rows"], target=targets,
                    valid=valid)

    def _prompt(self, shown, target):
        return prompts.session_prompt(self.vocab, [self.titles[row] for row in shown], self.has_image[shown],
                                      self.titles[target], m=self.m, max_title_tokens=self.max_title_tokens,
                                      max_prompt_items=self.max_prompt_items)


def _batches(config, to_batch, batch_size, *, shuffle, repeat, seed, process_index, process_count):
    """The shared chain from example positions to a checkpointable iterator of `to_batch(positions)`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if len(to_batch) == 0:
        raise ValueError("the pipeline's source is empty")
    per_step = batch_size * process_count
    length = len(to_batch) if repeat else -(-len(to_batch) // per_step) * per_step
    dataset = grain.MapDataset.range(length)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset[process_index::process_count]
    dataset = dataset.batch(batch_size, drop_remainder=repeat, batch_fn=np.asarray)
    dataset = dataset.map(to_batch)
    # Prefetch a few batches only: the default buffer (500 elements) would hold 500 batches of pixels.
    threads = config.data.read_threads
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    iterable = dataset.to_iter_dataset(read_options)
    if config.data.worker_count > 0:
        # Grain's workers read absl flags; an entry point without absl.app (benchmarks, notebooks) has
        # not parsed them, and the first batch raises UnparsedFlagAccessError. Their defaults are meant.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers pass each array in its own shared-memory block by default; for the many small arrays of
        # a batch that costs more than pickling them (session batches came twice as fast).
        options = grain.experimental.DatasetOptions(min_shm_size=MIN_SHARED_MEMORY_BYTES)
        iterable = grain.experimental.WithOptionsIterDataset(iterable, options)
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count))
    return iter(iterable)


def _index_and_valid(positions, length):
    """Record index int32 [B] (record 0 for positions past the source) and valid bool [B]."""
    valid = positions < length
    return np.where(valid, positions, 0).astype(np.int32), valid


def _concatenate(row_lists):
    """(flat int32 rows, int64 lengths) of a sequence of row lists; a RaggedRows gives its own arrays."""
    if isinstance(row_lists, prepared.RaggedRows):
        return row_lists.flat.astype(np.int32, copy=False), row_lists.lengths
    lengths = np.fromiter(map(len, row_lists), np.int64, count=len(row_lists))
    flat = np.concatenate([np.zeros(0, np.int32)] + [np.asarray(rows, np.int32) for rows in row_lists])
    return flat, lengths


def _item_texts(data, tokenizer):
    """Token ids of every item's title and category as written in prompts ([] when no category)."""
    titles = tokenizer_lib.encode(tokenizer, [prompts.title_text(title) for title in data.titles])
    categories = tokenizer_lib.encode(
        tokenizer, [prompts.title_text(category) if category else "" for category in data.categories])
    return titles, categories
