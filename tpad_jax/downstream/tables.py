"""Training examples of the downstream rows: padded prefix and session tables, length-bucketed batches.

Causal encoders (GRU4Rec, the causal transformer) read every prefix of a session in one pass
(`SessionTable`, `msbr.whole_sessions`); the others read one prefix per row (`PrefixTable`). Rows are
batched by length bucket (`msbr.length_buckets`) so that short ones are not padded to the full width.
"""

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np

from tpad_jax.cli import UserError
from tpad_jax.data import pipeline


def prefix_width(config) -> int:
    """Items an encoder sees: the last `max_session_length - 1` clicks (a whole session minus its target)."""
    return config.data.max_session_length - 1


def bucket_widths(buckets, full_width: int) -> list[int]:
    """The widths of the length buckets: those of `buckets` below `full_width`, then `full_width`."""
    return sorted({w for w in buckets if w < full_width} | {full_width})


def padded_examples(examples: pipeline.SessionExamples, width: int):
    """Right-padded prefixes (their last `width` items) of `examples`.

    Returns:
      (items int32 [n, width] with row 0 on padding, mask bool [n, width]).
    """
    items, mask, _ = examples.last_items(np.arange(len(examples)), width)
    return items, mask


def pad_prefixes(prefixes, width: int):
    """(items int32 [n, width], mask bool [n, width]) of a list of prefixes (item rows)."""
    examples = pipeline.SessionExamples.from_prefixes(prefixes, np.zeros(len(prefixes), np.int32))
    return padded_examples(examples, width)


@dataclasses.dataclass(frozen=True)
class PrefixTable:
    """Random-access training examples (items [width], mask [width], target) stored as padded arrays."""

    items: np.ndarray
    mask: np.ndarray
    targets: np.ndarray

    @classmethod
    def every_prefix(cls, sessions, width: int):
        """One example per position j >= 1 of each session: prefix session[:j], target session[j]."""
        examples = pipeline.SessionExamples.every_position(sessions)
        return cls(*padded_examples(examples, width), examples.targets.astype(np.int32))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.items[index], self.mask[index], self.targets[index]

    def batch(self, rows, width: int, valid):
        """{items [b, width], mask, target [b], valid [b]} of example `rows` (`valid` False on filler)."""
        return dict(items=self.items[rows, :width], mask=self.mask[rows, :width], target=self.targets[rows],
                    valid=valid)


@dataclasses.dataclass(frozen=True)
class SessionTable:
    """Whole sessions for causal encoders: inputs session[:-1], a target at every position.

    Holds exactly the (prefix, target) pairs of `PrefixTable.every_prefix`: a session of up to
    `width + 1` clicks is one row whose position j predicts click j + 1 from clicks 0..j. A longer
    session adds one row per later target: its last `width` clicks before that target, with only the
    last position counted, which is the prefix truncation `PrefixTable` applies.
    """

    items: np.ndarray  # int32 [n, width], right-padded
    mask: np.ndarray  # bool [n, width]
    targets: np.ndarray  # int32 [n, width], 0 where target_mask is False
    target_mask: np.ndarray  # bool [n, width]: positions whose prefix counts as an example

    @classmethod
    def every_session(cls, sessions, width: int):
        rows, targets, counted = [], [], []
        for session in sessions:
            session = np.asarray(session, np.int32)
            head = session[:width + 1]
            if len(head) >= 2:
                rows.append(head[:-1])
                targets.append(head[1:])
                counted.append(np.ones(len(head) - 1, bool))
            for end in range(width + 1, len(session)):
                rows.append(session[end - width:end])
                targets.append(np.concatenate([np.zeros(width - 1, np.int32), session[end:end + 1]]))
                counted.append(np.arange(width) == width - 1)
        n = len(rows)
        items = np.zeros((n, width), np.int32)
        target_table = np.zeros((n, width), np.int32)
        target_mask = np.zeros((n, width), bool)
        for i, (row, target, count) in enumerate(zip(rows, targets, counted)):
            items[i, :len(row)], target_table[i, :len(row)], target_mask[i, :len(row)] = row, target, count
        mask = np.arange(width)[None, :] < np.array([len(row) for row in rows], np.int64).reshape(-1, 1)
        return cls(items, mask, target_table, target_mask)

    def __len__(self):
        return len(self.items)

    def counts(self) -> np.ndarray:
        """Counted positions int64 [n] of each row."""
        return self.target_mask.sum(axis=1)

    def batch(self, rows, width: int, valid, shards: int, capacity: int):
        """{items, mask [b, width]; positions, target, valid [shards, capacity]}: the counted positions of
        the valid rows, listed per shard.

        Why listed: only the positions followed by a click count as examples (about 60 % of a batch's
        b x width on the synthetic catalogue), and the full-softmax loss, the largest cost of a step,
        need score no other. The b rows are `shards` consecutive blocks (the devices a process splits
        its batch over); shard s lists the flat positions (row x width + column, within its block) of
        its counted examples, their targets and valid=True, then filler (position 0, valid=False) up to
        `capacity` (`BucketedBatches.capacity`). `counted_vectors` reads them back.
        """
        blocks = (self.target_mask[rows, :width] & valid[:, None]).reshape(shards, -1)
        positions = np.zeros((shards, capacity), np.int32)
        keep = np.zeros((shards, capacity), bool)
        for shard, block in enumerate(blocks):
            flat = np.flatnonzero(block)
            if len(flat) > capacity:
                raise ValueError(f"{len(flat)} counted positions in a shard over its capacity {capacity}")
            positions[shard, :len(flat)], keep[shard, :len(flat)] = flat, True
        targets = self.targets[rows, :width].reshape(shards, -1)
        return dict(items=self.items[rows, :width], mask=self.mask[rows, :width], positions=positions,
                    target=np.take_along_axis(targets, positions, axis=1), valid=keep)


def counted_vectors(vectors, positions):
    """The position vectors [shards * capacity, d] of a `SessionTable.batch`'s listed positions.

    Args:
      vectors: [b, width, d] of every position of the batch's rows.
      positions: int32 [shards, capacity] per-shard flat positions (`SessionTable.batch`); under a mesh,
        both arrays are split over the same devices along their leading axis, so each device gathers
        from its own block.
    """
    shards = positions.shape[0]
    blocks = vectors.reshape(shards, -1, vectors.shape[-1])
    return jnp.take_along_axis(blocks, positions[..., None], axis=1).reshape(-1, vectors.shape[-1])


class BucketedBatches:
    """Random-access training batches of table rows grouped by length; batch i is batch i % n of epoch i // n.

    Every epoch shuffles the examples (seeded by `seed` and the epoch), sorts them into the first
    width of `widths` that holds them, and cuts each group into global batches of that width, so short
    prefixes (most of them) are not padded to the full width. A group's last batch is filled with
    `valid=False` rows, which keeps the number of batches per epoch fixed. Element i is this process's
    slice of global batch i: `table.batch(...)` (for a PrefixTable: items int32 [b, w], mask bool
    [b, w], target int32 [b], valid bool [b]; for a SessionTable, its counted positions listed over
    `shards` blocks, the devices this process splits a batch over).
    """

    def __init__(self, table: PrefixTable | SessionTable, widths, batch_size: int, seed: int, num_epochs: int,
                 process_index: int = 0, process_count: int = 1, shards: int = 1):
        self.table, self.widths, self.batch_size, self.seed = table, tuple(widths), batch_size, seed
        self.num_epochs, self.process_index, self.process_count = num_epochs, process_index, process_count
        self.shards = shards
        if list(self.widths) != sorted(self.widths) or self.widths[-1] != table.items.shape[1]:
            raise ValueError(f"bucket widths {self.widths} must increase up to the full width "
                             f"{table.items.shape[1]}")
        if batch_size % (process_count * shards):
            raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes x "
                             f"{shards} shards")
        self.bucket_of_example = np.searchsorted(np.asarray(self.widths), table.mask.sum(axis=1))
        counts = np.bincount(self.bucket_of_example, minlength=len(self.widths))
        self.batches_per_epoch = int(np.sum(-(-counts // batch_size)))
        self._plans = {}
        self.capacity = self._capacities() if isinstance(table, SessionTable) else None

    def _capacities(self) -> dict[int, int]:
        """{width: listed positions per shard}: the most counted positions any shard of any batch of that
        width holds over all epochs (every process plans all batches, so all agree), rounded up to a
        multiple of 8 so that nearby maxima share a compiled shape. One shape per width: one compile."""
        counts = np.append(self.table.counts(), 0)  # index -1 (filler) counts 0
        most = {width: 0 for width in self.widths}
        for epoch in range(self.num_epochs):
            for width, rows in self.plan(epoch):
                per_shard = counts[rows].reshape(self.process_count * self.shards, -1).sum(axis=1)
                most[width] = max(most[width], int(per_shard.max()))
        return {width: max(8, -(-value // 8) * 8) for width, value in most.items()}

    def plan(self, epoch: int) -> list:
        """[(width, example indices [batch_size], -1 on filler rows)] of one epoch, in training order."""
        if epoch not in self._plans:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(len(self.table))
            buckets = self.bucket_of_example[order]
            batches = []
            for bucket, width in enumerate(self.widths):
                members = order[buckets == bucket]
                filler = -len(members) % self.batch_size
                members = np.concatenate([members, np.full(filler, -1, members.dtype)])
                batches += [(width, chunk) for chunk in members.reshape(-1, self.batch_size)]
            self._plans[epoch] = [batches[i] for i in rng.permutation(len(batches))]
        return self._plans[epoch]

    def __len__(self):
        return self.num_epochs * self.batches_per_epoch

    def __getitem__(self, index):
        epoch, position = divmod(index, self.batches_per_epoch)
        width, rows = self.plan(epoch)[position]
        local = self.batch_size // self.process_count
        rows = rows[self.process_index * local:(self.process_index + 1) * local]
        valid = rows >= 0
        if self.capacity is None:
            return self.table.batch(np.where(valid, rows, 0), width, valid)
        return self.table.batch(np.where(valid, rows, 0), width, valid, self.shards, self.capacity[width])


def training_batches(config, table: PrefixTable | SessionTable, num_epochs: int, batch_size: int,
                     shards: int = 1):
    """The grain iterator over this process's `BucketedBatches` (checkpointable) and batches per epoch;
    `shards`: the blocks this process's devices split a batch into (`mesh.local_batch_shards`)."""
    msbr = config.msbr
    if batch_size % (jax.process_count() * shards):
        raise UserError(f"msbr batch size {batch_size} is not divisible by {jax.process_count()} processes "
                        f"x {shards} devices each")
    widths = bucket_widths(msbr.length_buckets, table.items.shape[1])
    source = BucketedBatches(table, widths, batch_size, config.seed, num_epochs,
                             jax.process_index(), jax.process_count(), shards)
    threads = config.data.read_threads
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(grain.MapDataset.source(source).to_iter_dataset(read_options)), source.batches_per_epoch
