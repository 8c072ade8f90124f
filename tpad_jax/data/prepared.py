"""PreparedData: the item table and protocol splits every stage consumes, prepared once per workdir.

`load_or_prepare(config, workdir)` resolves the data source, generates the synthetic catalogue when needed,
reads and validates the raw data, applies the protocol, and writes DIR/data/prepared/{catalogue.json,
splits.npz, stats.json, fingerprint.txt} (byte-identical for the same inputs). Later calls load those
files; they are prepared again only when the data config they were made from differs, or the bytes of a
canonical catalogue's split.json (its sha256 is part of that config). Delete DIR/data/prepared after
editing the other raw files of a canonical/adapter source.

A canonical catalogue with a split.json is split as listed (`protocol.split_given`); without one, by time
(`protocol.split_sessions`). stats.json says which (`"split"`).
"""

import collections.abc
import hashlib
import json
import logging
import os

import numpy as np

from tpad_jax import layout
from tpad_jax.cli import UserError
from tpad_jax.data import amazon2018, protocol, raw, srgnn_pickle, synthetic

SOURCES = ("synthetic", "canonical", "amazon2018", "srgnn_pickle")
SPLITS = ("train", "valid", "test")
PREPARED_FILES = ("catalogue.json", "splits.npz", "stats.json")
NO_CONTENT = "the catalogue has no content (no item has a title or an image)"
SIGNATURE_KEYS = ("raw_dir", "amazon_category", "protocol", "min_item_count", "min_session_length",
                  "max_session_length", "test_fraction", "valid_fraction", "on_error", "cold_threshold")


def resolve_source(data_config):
    """The effective source: "synthetic" with `raw_dir` set means "canonical"."""
    source = data_config.source
    if source not in SOURCES:
        raise UserError(f"data.source must be one of {SOURCES}, got {source!r}")
    if source == "synthetic" and data_config.raw_dir is not None:
        return "canonical"
    if source != "synthetic" and data_config.raw_dir is None:
        raise UserError(f"data.source={source!r} needs data.raw_dir")
    return source


def raw_dir_for(config, workdir):
    """Directory holding the raw catalogue (and its images) for this config, as an absolute path."""
    if resolve_source(config.data) == "synthetic":
        return os.path.abspath(layout.synthetic_raw_dir(workdir))
    return os.path.abspath(config.data.raw_dir)


def data_signature(config):
    """The config values the prepared files depend on (stored in catalogue.json)."""
    source = resolve_source(config.data)
    signature = {"source": source, **{key: config.data[key] for key in SIGNATURE_KEYS}}
    if config.data.train_fraction != 1.0:  # only then: data prepared before the key existed stays valid
        signature["train_fraction"] = config.data.train_fraction
    if source == "synthetic":
        signature["synthetic"] = dict(sorted(config.data.synthetic.to_dict().items()))
        signature["image_size"] = config.data.image_size
    split_path = given_split_path(source, config.data.raw_dir)
    if split_path:  # only then: data prepared from a catalogue without split.json stays valid
        with open(split_path, "rb") as f:
            signature["split_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return signature


def given_split_path(source, raw_dir):
    """raw_dir/split.json of a canonical catalogue that has one, else None."""
    if source != "canonical":
        return None
    path = os.path.join(os.path.abspath(raw_dir), raw.SPLIT_FILE)
    return path if os.path.exists(path) else None


def _write_atomic(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _json_bytes(value):
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def ensure_synthetic(config, raw_dir):
    """Generates the synthetic catalogue into `raw_dir` unless one with the same settings is there."""
    settings = {**config.data.synthetic.to_dict(), "image_size": config.data.image_size}
    marker = os.path.join(raw_dir, "generator.json")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == settings:
                return
    logging.info("generating the synthetic catalogue in %s", raw_dir)
    s = config.data.synthetic
    synthetic.generate(raw_dir, num_items=s.num_items, num_sessions=s.num_sessions,
                       cold_item_fraction=s.cold_item_fraction, noise=s.noise, seed=s.seed,
                       image_size=config.data.image_size)
    _write_atomic(marker, _json_bytes(settings))  # written last: marks a complete catalogue


def _read_raw(source, config, raw_dir, report):
    """Items, sessions and the given split ({name: sessions}, or None) of a session-level source."""
    on_error = config.data.on_error
    if source == "amazon2018":
        return (*amazon2018.load(raw_dir, config.data.amazon_category, on_error, report), None)
    items = raw.read_items(os.path.join(raw_dir, "items.jsonl"), on_error, report)
    sessions = raw.read_sessions(os.path.join(raw_dir, "sessions.jsonl"), {i.item_id for i in items},
                                 on_error, report)
    split_path = given_split_path(source, raw_dir)
    given = raw.read_split(split_path, sessions, on_error, report) if split_path else None
    return items, sessions, given


def _pickled_splits(config, raw_dir):
    """SR-GNN pickles as given: examples per split; validation = last valid_fraction of train examples."""
    if config.data.protocol != "srgnn":
        raise UserError(f"{raw_dir}: SR-GNN pickles come filtered, split and augmented; "
                        "set data.protocol='srgnn' to use them as given")
    if config.data.train_fraction != 1.0:
        raise UserError(f"{raw_dir}: data.train_fraction needs the session protocol; SR-GNN pickles are "
                        "used as given")
    items, train, test = srgnn_pickle.load(raw_dir)
    num_valid = int(round(len(train.targets) * config.data.valid_fraction))
    cut = len(train.targets) - num_valid
    examples = {
        "train": (train.prefixes[:cut], train.targets[:cut]),
        "valid": (train.prefixes[cut:], train.targets[cut:]),
        "test": (test.prefixes, test.targets),
    }
    sessions = {name: [p + [t] for p, t in zip(*pair)] for name, pair in examples.items()}
    filtering = {"as_given": "srgnn pickles: no filtering, split or augmentation"}
    return items, sessions, examples, filtering, "as given by the SR-GNN pickles"


def _session_splits(config, raw_dir, raw_data):
    """Protocol splits of raw sessions, by time or as `given` ({name: sessions} of split.json, or None);
    the item table keeps only items that occur in some split.

    Args:
      raw_data: the list [items, sessions, given] of `_read_raw`; emptied here, so that the raw sessions
        (a Python object per session and a pointer per click) are freed once the protocol has split them,
        not held beside the splits and their examples.
    Returns:
      (items, {split: sessions}, {split: examples}, filtering stats, a one-line description of the split).
    """
    d = config.data
    items, sessions, given = raw_data
    raw_data.clear()
    filters = dict(min_item_count=d.min_item_count, min_session_length=d.min_session_length,
                   max_session_length=d.max_session_length, valid_fraction=d.valid_fraction,
                   train_fraction=d.train_fraction)
    if given is None:
        splits = protocol.split_sessions(sessions, test_fraction=d.test_fraction, **filters)
        description = f"by time: the latest {d.test_fraction:g} of the sessions as test"
        read = f"{len(sessions)} sessions read"
    else:
        splits = protocol.split_given(given, **filters)
        listed = {name: len(given[name]) for name in SPLITS if name in given}
        splits.stats["sessions_not_in_split_json"] = len(sessions) - sum(listed.values())
        carved = ("" if "valid" in given else ", no validation" if not d.valid_fraction else
                  f", validation the latest {d.valid_fraction:g} of train")
        counts = " / ".join(f"{n} {name}" for name, n in listed.items())
        description = f"given by {raw.SPLIT_FILE}: {counts} sessions listed{carved}"
        read = f"{listed['train']} train sessions listed in {raw.SPLIT_FILE}"
    del sessions, given  # the splits hold what is kept
    if not splits.train:
        # Nothing downstream can train on an empty split (TFDS would only say "No examples were yielded").
        stats = splits.stats
        raise UserError(
            f"{raw_dir}: no train session left after the {d.protocol} protocol ({read}; "
            f"{stats['items_below_min_count']} items with fewer than data.min_item_count="
            f"{d.min_item_count} occurrences dropped; {stats['sessions_too_short']} sessions then shorter "
            f"than data.min_session_length={d.min_session_length})")
    by_split = {name: getattr(splits, name) for name in SPLITS}
    used = set().union(*(protocol.count_items(s) for s in by_split.values()))
    items = [item for item in items if item.item_id in used]
    examples = {name: protocol.make_examples(s, d.protocol) for name, s in by_split.items()}
    return items, by_split, examples, splits.stats, description


def _ragged(sequences, row):
    """Concatenated int32 rows and int64 offsets of a list of item-id sequences."""
    lengths = np.fromiter(map(len, sequences), np.int64, count=len(sequences))
    # fromiter, not array(list): no Python list of one entry per click on the way.
    flat = np.fromiter((row[i] for s in sequences for i in s), np.int32, count=int(lengths.sum()))
    return flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


class RaggedRows(collections.abc.Sequence):
    """The rows of a ragged int32 array (flat values + int64 offsets) as a read-only sequence of views.

    A row's view is made when it is read, not stored: a split costs its two arrays, not a Python object
    per session (about 100 bytes each, which made a loaded catalogue grow with its sessions).
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.flat[self.offsets[index]:self.offsets[index + 1]]

    def __repr__(self):
        return f"RaggedRows({len(self)} rows, {len(self.flat)} values)"


def _statistics(source, config, items, sessions, examples, report, filtering, split):
    train_counts = protocol.count_items(sessions["train"])
    test_targets = examples["test"][1]
    cold = sum(train_counts.get(t, 0) < config.data.cold_threshold for t in test_targets)
    return {
        "source": source,
        "protocol": config.data.protocol,
        "items": len(items),
        "items_with_title": sum(item.title is not None for item in items),
        "items_with_image": sum(item.image is not None for item in items),
        "split": split,
        "sessions": {name: len(sessions[name]) for name in SPLITS},
        "examples": {name: len(examples[name][1]) for name in SPLITS},
        "clicks": {name: sum(map(len, sessions[name])) for name in SPLITS},
        "avg_session_length": {
            name: round(float(np.mean([len(s) for s in sessions[name]])) if sessions[name] else 0.0, 4)
            for name in SPLITS},
        "cold_threshold": config.data.cold_threshold,
        "cold_target_share_test": round(cold / max(len(test_targets), 1), 4),
        "skipped": report.as_dict(),
        "filtering": filtering,
    }


def prepare(config, workdir):
    """Reads the raw data, applies the protocol and writes DIR/data/prepared/ (see module docstring)."""
    source = resolve_source(config.data)
    raw.check_on_error(config.data.on_error)
    raw_dir = raw_dir_for(config, workdir)
    report = raw.SkipReport()
    if source == "synthetic":
        ensure_synthetic(config, raw_dir)
    elif not os.path.isdir(raw_dir):
        raise UserError(f"data.raw_dir={config.data.raw_dir}: no such directory")
    if source == "srgnn_pickle":
        items, sessions, examples, filtering, split = _pickled_splits(config, raw_dir)
    else:
        items, sessions, examples, filtering, split = _session_splits(
            config, raw_dir, list(_read_raw(source, config, raw_dir, report)))
    row = {item.item_id: r for r, item in enumerate(items)}
    arrays = {}
    for name in SPLITS:
        arrays[f"{name}_session_items"], arrays[f"{name}_session_offsets"] = _ragged(sessions[name], row)
        prefixes, targets = examples[name]
        arrays[f"{name}_prefix_items"], arrays[f"{name}_prefix_offsets"] = _ragged(prefixes, row)
        arrays[f"{name}_targets"] = np.array([row[t] for t in targets], np.int32)
    catalogue = {
        "data_config": data_signature(config),
        "item_ids": [item.item_id for item in items],
        "titles": [item.title for item in items],
        "categories": [item.category for item in items],
        "images": [item.image for item in items],
    }
    stats = _statistics(source, config, items, sessions, examples, report, filtering, split)
    prepared_dir = layout.prepared_dir(workdir)
    os.makedirs(prepared_dir, exist_ok=True)
    _write_atomic(os.path.join(prepared_dir, "catalogue.json"), _json_bytes(catalogue))
    _write_atomic(os.path.join(prepared_dir, "stats.json"), _json_bytes(stats))
    raw.write_npz(os.path.join(prepared_dir, "splits.npz.tmp"), arrays)
    os.replace(os.path.join(prepared_dir, "splits.npz.tmp"), os.path.join(prepared_dir, "splits.npz"))
    # fingerprint.txt is written last: its presence marks a complete preparation.
    _write_atomic(os.path.join(prepared_dir, "fingerprint.txt"), (fingerprint(prepared_dir) + "\n").encode())


def fingerprint(prepared_dir):
    """sha256 over the prepared files' names and bytes."""
    digest = hashlib.sha256()
    for name in PREPARED_FILES:
        digest.update(name.encode())
        with open(os.path.join(prepared_dir, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


class PreparedData:
    """The prepared dataset: item table, split sessions and examples (item rows), statistics."""

    def __init__(self, prepared_dir, raw_dir, workdir):
        self.workdir = workdir  # where DIR/data/tfds and the other derived tables live
        with open(os.path.join(prepared_dir, "catalogue.json"), encoding="utf-8") as f:
            catalogue = json.load(f)
        with open(os.path.join(prepared_dir, "stats.json"), encoding="utf-8") as f:
            self.stats = json.load(f)
        with open(os.path.join(prepared_dir, "fingerprint.txt"), encoding="utf-8") as f:
            self.fingerprint = f.read().strip()
        with np.load(os.path.join(prepared_dir, "splits.npz"), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        config = catalogue["data_config"]
        self.source, self.protocol = config["source"], config["protocol"]
        self.cold_threshold = config["cold_threshold"]
        self.raw_dir = raw_dir
        self.item_ids = catalogue["item_ids"]
        # A null title reads as "" in prompts and the tokenizer; has_title tells the two apart.
        self.has_title = np.array([title is not None for title in catalogue["titles"]], bool)
        self.titles = [title or "" for title in catalogue["titles"]]
        self.categories = catalogue["categories"]
        self.image_paths = [None if image is None else os.path.join(raw_dir, image)
                            for image in catalogue["images"]]
        self.has_image = np.array([path is not None for path in self.image_paths], bool)
        self.num_items = len(self.item_ids)
        self._sessions, self._examples = {}, {}
        for name in SPLITS:
            sessions = RaggedRows(arrays[f"{name}_session_items"], arrays[f"{name}_session_offsets"])
            prefixes = RaggedRows(arrays[f"{name}_prefix_items"], arrays[f"{name}_prefix_offsets"])
            self._sessions[name], self._examples[name] = sessions, (prefixes, arrays[f"{name}_targets"])
        self.train, self.valid, self.test = (self._sessions[name] for name in SPLITS)
        self.train_item_counts = np.bincount(arrays["train_session_items"], minlength=self.num_items)
        self.train_item_counts = self.train_item_counts.astype(np.int64)
        self._oracle = {}

    @property
    def has_content(self) -> bool:
        """Whether some item has a title or an image: the towers and the content rows need one."""
        return bool(self.has_title.any() or self.has_image.any())

    def examples(self, split):
        """(prefixes: RaggedRows of int32 rows, targets: int32 [n]) of `split`, as the protocol defines them."""
        return self._examples[split]

    def cold_mask(self, targets):
        """True where a target item occurs fewer than `cold_threshold` times in train."""
        return self.train_item_counts[np.asarray(targets)] < self.cold_threshold

    def oracle_scores(self, split):
        """True next-item probabilities float32 [num_examples, num_items] (synthetic only, else None).

        See `synthetic.oracle_scores` for the approximation where the protocol removed items.
        """
        if self.source != "synthetic":
            return None
        if split not in self._oracle:
            process = synthetic.SessionProcess.load(os.path.join(self.raw_dir, "oracle.npz"))
            prefixes = [[self.item_ids[r] for r in prefix] for prefix in self._examples[split][0]]
            self._oracle[split] = synthetic.oracle_scores(process, prefixes, self.item_ids)
        return self._oracle[split]


def _is_current(prepared_dir, config):
    """Whether complete prepared files made from this data config are in `prepared_dir`."""
    marker = os.path.join(prepared_dir, "fingerprint.txt")
    if not os.path.exists(marker):
        return False
    with open(os.path.join(prepared_dir, "catalogue.json"), encoding="utf-8") as f:
        stored = json.load(f)["data_config"]
    with open(marker, encoding="utf-8") as f:
        recorded = f.read().strip()
    return stored == data_signature(config) and recorded == fingerprint(prepared_dir)


def load_or_prepare(config, workdir):
    """PreparedData for `config` in `workdir`; prepares DIR/data/prepared/ on the first call."""
    prepared_dir = layout.prepared_dir(workdir)
    if not _is_current(prepared_dir, config):
        prepare(config, workdir)
    return PreparedData(prepared_dir, raw_dir_for(config, workdir), workdir)
