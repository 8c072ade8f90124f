"""The canonical raw format (items.jsonl, sessions.jsonl, images/) with readers that name every bad field.

items.jsonl:    {"item_id": str, "title": str, "category": str | null, "image": "relative/path.jpg" | null}
sessions.jsonl: {"session_id": str, "items": [item_id, ...], "timestamp": int | null}   (click order)

Image paths are relative to the directory holding items.jsonl. `category`, `image` and `timestamp` may be
absent (read as null). With `on_error="raise"` the first bad record raises `RawFormatError`; with
`on_error="skip"` the record is skipped (an unknown item inside a session drops only that click) and the
reason is counted in a `SkipReport`, which ends up in the dataset statistics.
"""

import collections
import dataclasses
import json
import os
import zipfile

import numpy as np
from PIL import Image

ON_ERROR_CHOICES = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    category: str | None
    image: str | None  # relative to the catalogue directory


@dataclasses.dataclass(frozen=True)
class Session:
    session_id: str
    items: list[str]
    timestamp: int | None


class RawFormatError(ValueError):
    """A bad record: `str()` reads `items.jsonl:17: field 'title': missing`."""

    def __init__(self, path, line, field, message):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = f"{self.path}:{line}" if line else self.path
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


class SkipReport:
    """Counts skipped records (or clicks) by reason; nothing is dropped without a count here."""

    def __init__(self):
        self.counts = collections.Counter()

    def add(self, reason, count=1):
        self.counts[reason] += count

    def as_dict(self):
        return dict(sorted(self.counts.items()))


def check_on_error(on_error):
    """Raises ValueError unless `on_error` is "raise" or "skip"."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def handle_error(error, reason, on_error, report):
    """Raises `error` (on_error="raise") or counts `reason` in `report` (on_error="skip")."""
    if on_error == "raise":
        raise error
    report.add(reason)


def verify_image(path):
    """Returns None if PIL can open and verify the file at `path`, else the reason and a message."""
    if not os.path.isfile(path):
        return "image_missing", f"file {path} does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many exception types for corrupt files
        return "image_unreadable", f"file {path} cannot be decoded: {e}"
    return None


def _records(path):
    """Yields (line_number, parsed JSON or the JSONDecodeError) for each non-blank line of `path`."""
    seen_any = False
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen_any = True
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, e
    if not seen_any:
        raise RawFormatError(path, 0, None, "empty file: no records")


def _check_type(record, field, types, path, line, *, required, type_name):
    """Returns record[field] if it has one of `types` (absent -> None when not required), else raises."""
    if field not in record or record[field] is None:
        if required:
            raise RawFormatError(path, line, field, "missing")
        return None
    value = record[field]
    # bool is an int subclass; a JSON true is never a timestamp.
    if not isinstance(value, types) or isinstance(value, bool):
        raise RawFormatError(path, line, field, f"expected {type_name}, got {type(value).__name__}")
    return value


def _parse_item(record, path, line, catalogue_dir):
    """One items.jsonl record -> Item (raises RawFormatError with a skip reason attached)."""
    if not isinstance(record, dict):
        raise _with_reason(RawFormatError(path, line, None, "expected a JSON object"), "wrong_type")
    try:
        item_id = _check_type(record, "item_id", str, path, line, required=True, type_name="string")
        title = _check_type(record, "title", str, path, line, required=True, type_name="string")
        category = _check_type(record, "category", str, path, line, required=False, type_name="string")
        image = _check_type(record, "image", str, path, line, required=False, type_name="string")
    except RawFormatError as e:
        raise _with_reason(e, "missing_field" if e.message == "missing" else "wrong_type")
    if not item_id.strip():
        raise _with_reason(RawFormatError(path, line, "item_id", "empty"), "missing_field")
    if not title.strip():
        raise _with_reason(RawFormatError(path, line, "title", "empty"), "missing_title")
    if image is not None:
        problem = verify_image(os.path.join(catalogue_dir, image))
        if problem:
            raise _with_reason(RawFormatError(path, line, "image", problem[1]), problem[0])
    return Item(item_id, title, category, image)


def _with_reason(error, reason):
    error.reason = reason
    return error


def read_items(path, on_error="raise", report=None):
    """Reads items.jsonl; images are checked (exist, PIL-decodable) relative to its directory.

    Args:
      path: the items.jsonl file.
      on_error: "raise" (RawFormatError on the first bad record) or "skip" (count it in `report`).
      report: SkipReport collecting skip reasons (a fresh one when None).
    Returns:
      list[Item] in file order.
    """
    catalogue_dir = os.path.dirname(os.path.abspath(path))
    items = _read_records(path, lambda record, line: _parse_item(record, path, line, catalogue_dir),
                          "item_id", on_error, report)
    if not items:
        raise RawFormatError(path, 0, None, "no valid items")
    return items


def _read_records(path, parse, id_field, on_error, report):
    """Parses every JSON line of `path` with `parse(record, line)`; bad lines and repeated ids of
    `id_field` raise or are skipped and counted, as `on_error` says."""
    check_on_error(on_error)
    report = SkipReport() if report is None else report
    parsed, seen = [], set()
    for line, record in _records(path):
        if isinstance(record, json.JSONDecodeError):
            error = RawFormatError(path, line, None, f"malformed JSON: {record.msg}")
            handle_error(error, "malformed_json", on_error, report)
            continue
        try:
            value = parse(record, line)
        except RawFormatError as e:
            handle_error(e, e.reason, on_error, report)
            continue
        key = getattr(value, id_field)
        if key in seen:
            kind = id_field.removesuffix("_id")
            error = RawFormatError(path, line, id_field, f"duplicate {kind} id {key!r}")
            handle_error(error, f"duplicate_{id_field}", on_error, report)
            continue
        seen.add(key)
        parsed.append(value)
    return parsed


def _parse_session(record, path, line, known_items, on_error, report):
    """One sessions.jsonl record -> Session; unknown items raise or are dropped click by click."""
    if not isinstance(record, dict):
        raise _with_reason(RawFormatError(path, line, None, "expected a JSON object"), "wrong_type")
    try:
        session_id = _check_type(record, "session_id", str, path, line, required=True, type_name="string")
        clicks = _check_type(record, "items", list, path, line, required=True, type_name="list")
        timestamp = _check_type(record, "timestamp", int, path, line, required=False, type_name="int")
    except RawFormatError as e:
        raise _with_reason(e, "missing_field" if e.message == "missing" else "wrong_type")
    for click in clicks:
        if not isinstance(click, str):
            message = f"expected item id strings, got {type(click).__name__}"
            error = RawFormatError(path, line, "items", message)
            raise _with_reason(error, "wrong_type")
    kept = []
    for click in clicks:
        if click in known_items:
            kept.append(click)
        else:
            error = _with_reason(RawFormatError(path, line, "items", f"unknown item {click!r}"),
                                 "unknown_item_click")
            handle_error(error, error.reason, on_error, report)
    return Session(session_id, kept, timestamp)


def read_sessions(path, known_items, on_error="raise", report=None):
    """Reads sessions.jsonl, checking that every clicked item is in `known_items`.

    Args:
      path: the sessions.jsonl file.
      known_items: set of valid item ids.
      on_error: "raise" or "skip" (a bad record is skipped; an unknown item drops only that click).
      report: SkipReport collecting skip reasons (a fresh one when None).
    Returns:
      list[Session] in file order.
    """
    report = SkipReport() if report is None else report  # shared with the click-level skips
    parse = lambda record, line: _parse_session(record, path, line, known_items, on_error, report)  # noqa: E731
    return _read_records(path, parse, "session_id", on_error, report)


def write_items(path, items):
    """Writes items.jsonl (one JSON object per line, fixed key order: byte-identical for equal input)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(dataclasses.asdict(item), ensure_ascii=False) + "\n")


def write_sessions(path, sessions):
    """Writes sessions.jsonl (one JSON object per line, fixed key order)."""
    with open(path, "w", encoding="utf-8") as f:
        for session in sessions:
            f.write(json.dumps(dataclasses.asdict(session), ensure_ascii=False) + "\n")


def write_npz(path, arrays):
    """Writes an .npz like np.savez, but byte-identical for equal arrays (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[name]), allow_pickle=False)
