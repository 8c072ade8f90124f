"""SR-GNN / GCE-GNN preprocessed session pickles -> canonical items and pre-split examples.

`raw_dir/train.txt` and `raw_dir/test.txt` each hold a pickled pair `(sequences, targets)`: one example per
(already augmented) prefix, in the preprocessing's time order. These files are used as given: the
preprocessing already filtered rare items, split by time and augmented every prefix, so the srgnn protocol
does not filter, split or augment again. Validation is the last `valid_fraction` of the train examples.
Each split's sessions are the examples' `prefix + [target]` (so train item counts count augmented
occurrences, which is what models trained on these files see). `all_train_seq.txt` (GCE-GNN's
un-augmented train sessions) is not needed and not read.

Unpickling is restricted: `find_class` refuses every global, so only builtin lists, tuples, ints and
strings can load; a pickle naming any class or function fails with a clear error instead of running it.
Items carry IDs only: titles become "item <id>", no category, no image.
"""

import dataclasses
import io
import os
import pickle

from tpad_jax.data import raw


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Loads only pickle's builtin containers and scalars; any global reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only lists, tuples, ints "
                                     "and strings are allowed in session pickles")


@dataclasses.dataclass
class PickledExamples:
    prefixes: list[list[str]]
    targets: list[str]


def _load_pickle(path):
    raw.check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _BuiltinsOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # refused globals, truncated or non-pickle bytes: UnpicklingError, EOFError, ...
        raise raw.RawFormatError(path, 0, None, f"not a valid session pickle: {e}") from e


def _item_id(value, path, index, field):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise raw.RawFormatError(path, index, field, f"expected an int item id, got {type(value).__name__}")
    return str(value)


def read_examples(path):
    """Reads one `(sequences, targets)` pickle; `line` in errors is the 1-based example index."""
    data = _load_pickle(path)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise raw.RawFormatError(path, 0, None, "expected a pair (sequences, targets)")
    sequences, targets = data
    if not isinstance(sequences, (tuple, list)) or not isinstance(targets, (tuple, list)):
        raise raw.RawFormatError(path, 0, None, "sequences and targets must be lists")
    if len(sequences) != len(targets):
        raise raw.RawFormatError(path, 0, None, f"{len(sequences)} sequences but {len(targets)} targets")
    prefixes = []
    for index, sequence in enumerate(sequences, start=1):
        if not isinstance(sequence, (tuple, list)) or not sequence:
            raise raw.RawFormatError(path, index, "sequences", "expected a non-empty list of item ids")
        prefixes.append([_item_id(v, path, index, "sequences") for v in sequence])
    target_ids = [_item_id(v, path, index, "targets") for index, v in enumerate(targets, start=1)]
    if not prefixes:
        raise raw.RawFormatError(path, 0, None, "empty file: no examples")
    return PickledExamples(prefixes, target_ids)


def _id_order(item_id):
    return (0, int(item_id), "") if item_id.lstrip("-").isdigit() else (1, 0, item_id)


def load(raw_dir):
    """Reads train.txt and test.txt in `raw_dir`.

    Returns:
      (items, train, test): list[raw.Item] ordered by numeric id, and PickledExamples per split.
    """
    train = read_examples(os.path.join(raw_dir, "train.txt"))
    test = read_examples(os.path.join(raw_dir, "test.txt"))
    ids = set()
    for split in (train, test):
        ids.update(split.targets)
        for prefix in split.prefixes:
            ids.update(prefix)
    items = [raw.Item(i, f"item {i}", None, None) for i in sorted(ids, key=_id_order)]
    return items, train, test
