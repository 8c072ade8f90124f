"""The canonical raw format (items.jsonl, sessions.jsonl, images/, split.json) with readers that name every
bad field.

items.jsonl:    {"item_id": str, "title": str | null, "category": str | null, "image": "path.jpg" | null}
sessions.jsonl: {"session_id": str, "items": [item_id, ...], "timestamp": int | null}   (click order)
split.json:     {"train": [session_id, ...], "test": [session_id, ...], "valid": [...]}  (optional file;
                "valid" optional too)

Files are UTF-8 (a leading byte-order mark is dropped; CRLF line ends and blank lines are fine). Image
paths are relative to the directory holding items.jsonl and must resolve inside it, symlinks included.
`category`, `image` and `timestamp` may be absent (read as null). `title` may be null (an item known by
its id only; a catalogue where no item has a title or an image is ID-only) but not absent, so a misspelt
key is not read as "no title". With `on_error="raise"` the first bad record raises `RawFormatError`; with
`on_error="skip"` the record is skipped (an unknown item inside a session drops only that click; a listed
session id that sessions.jsonl lacks drops only that id) and the reason is counted in a `SkipReport`,
which ends up in the dataset statistics.
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


# slots: no per-instance __dict__ (about 100 bytes), so a catalogue's sessions cost their clicks, ids and
# a small object each while the protocol splits them.
@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str | None  # None: the item has no text
    category: str | None
    image: str | None  # relative to the catalogue directory


@dataclasses.dataclass(frozen=True, slots=True)
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


JSON_LINES_POLICIES = ON_ERROR_CHOICES + ("tolerate_torn_end",)


def json_lines(path, on_error="raise", report=None, *, opener=open):
    """Yields (line number, dict) for each JSON object line of `path`; bad lines go as `on_error` says.

    The file is read as bytes with `opener` (`gzip.open` for .json.gz) and decoded line by line, so a
    byte that is not UTF-8 is reported with its line (reason "not_utf8") and the lines around it still
    read. A UTF-8 byte-order mark (spreadsheet exports write one) is dropped; CRLF is JSON whitespace;
    blank lines are skipped. Other bad lines: malformed JSON ("malformed_json"), a value that is not an
    object ("wrong_type"), and a compressed file that ends early ("truncated_file", after its last whole
    line; reading stops there).

    Args:
      path: the file.
      on_error: "raise" (RawFormatError `file:line: ...` on the first bad line), "skip" (count its reason
        in `report`) or "tolerate_torn_end": a last line without its newline that is not JSON, which a
        process killed while appending leaves (metrics logs), is dropped; any other bad line raises.
      report: SkipReport for on_error="skip" (a fresh one when None).
    """
    if on_error not in JSON_LINES_POLICIES:
        raise ValueError(f"on_error must be one of {JSON_LINES_POLICIES}, got {on_error!r}")
    report = SkipReport() if report is None else report
    strict = "raise" if on_error == "tolerate_torn_end" else on_error
    check_file(path)
    line_number = 0
    try:
        with opener(path, "rb") as f:
            for line_number, line in enumerate(f, start=1):
                record = parse_json_line(line, path, line_number)
                if isinstance(record, RawFormatError):
                    torn = not line.endswith(b"\n") and record.reason in ("not_utf8", "malformed_json")
                    if not (torn and on_error == "tolerate_torn_end"):
                        handle_error(record, record.reason, strict, report)
                elif record is not None:
                    yield line_number, record
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        error = RawFormatError(path, line_number + 1, None, f"truncated or corrupt compressed data ({e})")
        handle_error(error, "truncated_file", strict, report)


def parse_json_line(line: bytes, path, line_number: int):
    """The JSON object of one line of bytes, a RawFormatError (with its skip reason), or None if blank.

    Line 1 may start with a UTF-8 byte-order mark; it is dropped. Readers of streams (standard input)
    call this line by line; `json_lines` does for files.
    """
    if line_number == 1:
        line = line.removeprefix(codecs.BOM_UTF8)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        message = f"not UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}"
        return _with_reason(RawFormatError(path, line_number, None, message), "not_utf8")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        error = RawFormatError(path, line_number, None, f"malformed JSON: {e.msg}")
        return _with_reason(error, "malformed_json")
    if not isinstance(record, dict):
        return _with_reason(RawFormatError(path, line_number, None, "expected a JSON object"), "wrong_type")
    return record


def _records(path, on_error, report):
    """`json_lines` of a canonical file, which must hold at least one line (a skipped one counts)."""
    # Nothing else adds to `report` before the first record is yielded: a count that grew is a skip here.
    skipped_before = sum(report.counts.values())
    seen_any = False
    for line_number, record in json_lines(path, on_error, report):
        seen_any = True
        yield line_number, record
    if not seen_any and sum(report.counts.values()) == skipped_before:
        raise RawFormatError(path, 0, None, "empty file: no records")


def _check_type(record, field, types, path, line, *, required, type_name, nullable=False):
    """Returns record[field] if it has one of `types`, else raises.

    Absent or null is None when not `required`; a `nullable` field must be present but may be null.
    """
    if field not in record or record[field] is None:
        if required and not (nullable and field in record):
            raise RawFormatError(path, line, field, "missing")
        return None
    value = record[field]
    # bool is an int subclass; a JSON true is never a timestamp.
    if not isinstance(value, types) or isinstance(value, bool):
        raise RawFormatError(path, line, field, f"expected {type_name}, got {type(value).__name__}")
    return value


def _parse_item(record, path, line, catalogue_dir):
    """One items.jsonl record -> Item (raises RawFormatError with a skip reason attached)."""
    try:
        item_id = _check_type(record, "item_id", str, path, line, required=True, type_name="string")
        title = _check_type(record, "title", str, path, line, required=True, nullable=True,
                            type_name="string")
        category = _check_type(record, "category", str, path, line, required=False, type_name="string")
        image = _check_type(record, "image", str, path, line, required=False, type_name="string")
    except RawFormatError as e:
        raise _with_reason(e, "missing_field" if e.message == "missing" else "wrong_type")
    if not item_id.strip():
        raise _with_reason(RawFormatError(path, line, "item_id", "empty"), "missing_field")
    if title is not None and not title.strip():
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
    for line, record in _records(path, on_error, report):
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
        item_id = known_items.get(click)
        if item_id is not None:
            kept.append(item_id)
        else:
            error = _with_reason(RawFormatError(path, line, "items", f"unknown item {click!r}"),
                                 "unknown_item_click")
            handle_error(error, error.reason, on_error, report)
    return Session(session_id, kept, timestamp)


def canonical_ids(item_ids):
    """{id: id} over `item_ids`: clicks stored as these very strings cost a pointer each, not a string.

    Every click JSON parses is a new string object (about 50 bytes); kept, they made a catalogue's
    sessions grow with its events at string size. Looked up here, the parsed string is freed at once.
    """
    return {item_id: item_id for item_id in item_ids}


def read_sessions(path, known_items, on_error="raise", report=None):
    """Reads sessions.jsonl, checking that every clicked item is in `known_items`.

    Clicks are stored as the strings of `known_items` (`canonical_ids`): the sessions' memory grows by a
    pointer per click.

    Args:
      path: the sessions.jsonl file.
      known_items: set of valid item ids.
      on_error: "raise" or "skip" (a bad record is skipped; an unknown item drops only that click).
      report: SkipReport collecting skip reasons (a fresh one when None).
    Returns:
      list[Session] in file order.
    """
    report = SkipReport() if report is None else report  # shared with the click-level skips
    known_items = canonical_ids(known_items)
    parse = lambda record, line: _parse_session(record, path, line, known_items, on_error, report)  # noqa: E731
    return _read_records(path, parse, "session_id", on_error, report)


SPLIT_FILE = "split.json"
SPLIT_KEYS = ("train", "valid", "test")
REQUIRED_SPLIT_KEYS = ("train", "test")


def read_split(path, sessions, on_error="raise", report=None):
    """Reads a given split (split.json) and resolves its session ids against `sessions`.

    The file's shape (an object with lists "train" and "test", optionally "valid", of id strings) is
    checked first and always raises. A listed id that `sessions` lacks, or one listed twice, raises
    (on_error="raise") or is dropped and counted (reasons "split_id_not_in_sessions",
    "split_id_listed_twice"; the first listing wins).

    Args:
      path: the split.json file.
      sessions: list[Session] read from sessions.jsonl next to it.
      on_error: "raise" or "skip".
      report: SkipReport collecting skip reasons (a fresh one when None).
    Returns:
      {split name: list[Session] in the listed order} for each split the file lists.
    """
    check_on_error(on_error)
    report = SkipReport() if report is None else report
    text, listed = _split_lists(path)
    by_id = {session.session_id: session for session in sessions}
    sessions_file = os.path.join(os.path.dirname(path), "sessions.jsonl")
    chosen, listed_in = {}, {}
    for name, ids in listed.items():
        chosen[name] = []
        for session_id in ids:
            if session_id in listed_in:
                line = _line_of(text, name, session_id, skip=int(listed_in[session_id] == name))
                error = RawFormatError(path, line, name, f"session id {session_id!r} listed twice (also in "
                                       f"{listed_in[session_id]!r})")
                handle_error(error, "split_id_listed_twice", on_error, report)
            elif session_id not in by_id:
                error = RawFormatError(path, _line_of(text, name, session_id), name,
                                       f"session id {session_id!r} not in {sessions_file}")
                handle_error(error, "split_id_not_in_sessions", on_error, report)
            else:
                listed_in[session_id] = name
                chosen[name].append(by_id[session_id])
    return chosen


def _split_lists(path):
    """(text, {split name: list of id strings}) of a split.json whose shape is checked."""
    check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RawFormatError(path, line, None, f"not UTF-8: byte 0x{data[e.start]:02x}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RawFormatError(path, e.lineno, None, f"malformed JSON: {e.msg}") from None
    expected = 'expected {"train": [session ids], "test": [session ids]} and optionally "valid"'
    if not isinstance(value, dict):
        raise RawFormatError(path, 1, None, expected)
    for key in value:
        if key not in SPLIT_KEYS:
            raise RawFormatError(path, _line_of(text, key), key, f"unknown key; {expected}")
    for key in REQUIRED_SPLIT_KEYS:
        if key not in value:
            raise RawFormatError(path, 1, key, "missing")
    for key, ids in value.items():
        if not isinstance(ids, list):
            raise RawFormatError(path, _line_of(text, key), key,
                                 f"expected a list of session ids, got {type(ids).__name__}")
        for session_id in ids:
            if not isinstance(session_id, str):
                raise RawFormatError(path, _line_of(text, key), key,
                                     f"expected session id strings, got {type(session_id).__name__}")
    return text, {key: value[key] for key in SPLIT_KEYS if key in value}


def _line_of(text, key, value=None, skip=0):
    """1-based line of `"key"` in a JSON text, or of the string `value` after it, past `skip` earlier
    occurrences (0 when not found). Only for messages: called on errors, it scans the text."""
    position = text.find(json.dumps(key))
    needle = json.dumps(value, ensure_ascii=False)
    for _ in range(skip + 1 if value is not None else 0):
        if position < 0:
            break
        position = text.find(needle, position + 1)
    return text.count("\n", 0, position) + 1 if position >= 0 else 0


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
