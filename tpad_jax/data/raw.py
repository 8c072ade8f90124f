"""The canonical raw format (items.jsonl, sessions.jsonl, images/) with readers that name every bad field.

items.jsonl:    {"item_id": str, "title": str, "category": str | null, "image": "relative/path.jpg" | null}
sessions.jsonl: {"session_id": str, "items": [item_id, ...], "timestamp": int | null}   (click order)

Files are UTF-8 (a leading byte-order mark is dropped; CRLF line ends and blank lines are fine). Image
paths are relative to the directory holding items.jsonl and must resolve inside it, symlinks included.
`category`, `image` and `timestamp` may be absent (read as null). With `on_error="raise"` the first bad
record raises `RawFormatError`; with `on_error="skip"` the record is skipped (an unknown item inside a
session drops only that click) and the reason is counted in a `SkipReport`, which ends up in the dataset
statistics.
"""

import codecs
import collections
import dataclasses
import gzip
import json
import os
import zipfile
import zlib

import numpy as np
from PIL import Image

from tpad_jax.cli import UserError

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


class RawFormatError(UserError):
    """A bad record or file: `str()` reads `items.jsonl:17: field 'title': missing`."""

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
    """Raises UserError unless `on_error` is "raise" or "skip"."""
    if on_error not in ON_ERROR_CHOICES:
        raise UserError(f"data.on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def handle_error(error, reason, on_error, report):
    """Raises `error` (on_error="raise") or counts `reason` in `report` (on_error="skip")."""
    if on_error == "raise":
        raise error
    report.add(reason)


def check_file(path):
    """Raises RawFormatError unless `path` is an existing file."""
    if not os.path.isfile(path):
        raise RawFormatError(path, 0, None, "not a file" if os.path.exists(path) else "no such file")


def check_image(catalogue_dir, relative):
    """Returns None if `relative` names a decodable image inside `catalogue_dir`, else (skip reason, message).

    The path is resolved, symlinks included, before the check: neither `../x.png` nor a link in images/
    makes the pipeline read a file outside the catalogue.
    """
    root = os.path.realpath(catalogue_dir)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        return "image_outside_catalogue", f"{relative} resolves to {path}, outside the catalogue {root}"
    return verify_image(path)


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


def json_lines(path, opener=open):
    """Yields (line number, parsed JSON value or a RawFormatError) for each non-blank line of `path`.

    The file is read as bytes with `opener` (`gzip.open` for .json.gz) and decoded line by line, so a
    byte that is not UTF-8 is reported with its line (reason "not_utf8") and the lines around it still
    read. A UTF-8 byte-order mark (spreadsheet exports write one) is dropped; CRLF is JSON whitespace.
    A compressed file that ends early yields one error (reason "truncated_file") after its last whole
    line, then stops.
    """
    check_file(path)
    line_number = 0
    try:
        with opener(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                yield from _parse_line(line.removeprefix(codecs.BOM_UTF8) if line_number == 1 else line,
                                       path, line_number)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        error = RawFormatError(path, line_number + 1, None, f"truncated or corrupt compressed data ({e})")
        yield line_number + 1, _with_reason(error, "truncated_file")


def _parse_line(line, path, line_number):
    """(line number, JSON value or RawFormatError) of one line of bytes; nothing for a blank line."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        message = f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}"
        yield line_number, _with_reason(RawFormatError(path, line_number, None, message), "not_utf8")
        return
    if not text.strip():
        return
    try:
        yield line_number, json.loads(text)
    except json.JSONDecodeError as e:
        error = RawFormatError(path, line_number, None, f"malformed JSON: {e.msg}")
        yield line_number, _with_reason(error, "malformed_json")


def _records(path):
    """`json_lines(path)` of a canonical file, which must hold at least one line."""
    seen_any = False
    for line_number, record in json_lines(path):
        seen_any = True
        yield line_number, record
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
        problem = check_image(catalogue_dir, image)
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
        if isinstance(record, RawFormatError):
            handle_error(record, record.reason, on_error, report)
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
