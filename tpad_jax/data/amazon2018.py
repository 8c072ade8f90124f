"""Amazon Review Data 2018 (as published) -> canonical items and sessions.

Files in `raw_dir`: `meta_<Cat>.json.gz` (one JSON object per line: "asin", "title", "category" (a list,
most general first; we keep the last element), "imageURL", ...), `<Cat>_5.json.gz` (reviews: "reviewerID",
"asin", "unixReviewTime", ...) and optionally `images/<asin>.jpg` or `.png` (downloaded by the user; the
URLs in the metadata are not fetched). A session is one reviewer's reviews on one UTC day, in time order
(ties keep file order), with session_id f"{reviewerID}_{YYYY-MM-DD}", as MMSBR and DIMO build them.

Some lines of the published metadata dumps are Python literals rather than JSON (the official loader
calls `eval` on them). We never evaluate them: they are reported as malformed records (raise, or skip
and count with `on_error="skip"`).
"""

import datetime
import glob
import gzip
import os

from tpad_jax.cli import UserError
from tpad_jax.data import raw

IMAGE_EXTENSIONS = (".jpg", ".png")
SECONDS_PER_DAY = 86400


def resolve_category(raw_dir, category):
    """Returns `category`, or the only <Cat> with a meta_<Cat>.json.gz in `raw_dir` when it is None."""
    if category is not None:
        return category
    found = sorted(glob.glob(os.path.join(raw_dir, "meta_*.json.gz")))
    if len(found) != 1:
        names = [os.path.basename(f) for f in found]
        raise UserError(f"{raw_dir}: set data.amazon_category; expected exactly one meta_*.json.gz, "
                        f"found {names}")
    return os.path.basename(found[0])[len("meta_"):-len(".json.gz")]


def _field(record, name, types, path, line, on_error, report):
    """Returns record[name] if present with the right type; else raises or counts and returns None."""
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        error = raw.RawFormatError(path, line, name, "missing or empty")
        raw.handle_error(error, "missing_title" if name == "title" else "missing_field", on_error, report)
        return None
    if not isinstance(value, types) or isinstance(value, bool):
        error = raw.RawFormatError(path, line, name, f"wrong type {type(value).__name__}")
        raw.handle_error(error, "wrong_type", on_error, report)
        return None
    return value


def _image_for(raw_dir, asin, path, line, on_error, report):
    """Relative path of images/<asin>.jpg|.png if present, inside `raw_dir` and decodable, else None."""
    for extension in IMAGE_EXTENSIONS:
        relative = os.path.join("images", asin + extension)
        if os.path.lexists(os.path.join(raw_dir, relative)):
            problem = raw.check_image(raw_dir, relative)
            if problem:
                error = raw.RawFormatError(path, line, "image", problem[1])
                raw.handle_error(error, problem[0], on_error, report)
                return None
            return relative
    return None


def read_meta(path, raw_dir, on_error, report):
    """Reads meta_<Cat>.json.gz -> list[raw.Item] in file order."""
    items, seen = [], set()
    for line, record in raw.json_lines(path, on_error, report, opener=gzip.open):
        asin = _field(record, "asin", str, path, line, on_error, report)
        if asin is None:
            continue
        title = _field(record, "title", str, path, line, on_error, report)
        if title is None:
            continue
        categories = record.get("category") or []
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            error = raw.RawFormatError(path, line, "category", "expected a list of strings")
            raw.handle_error(error, "wrong_type", on_error, report)
            continue
        if asin in seen:
            error = raw.RawFormatError(path, line, "asin", f"duplicate item id {asin!r}")
            raw.handle_error(error, "duplicate_item_id", on_error, report)
            continue
        seen.add(asin)
        image = _image_for(raw_dir, asin, path, line, on_error, report)
        items.append(raw.Item(asin, title.strip(), categories[-1] if categories else None, image))
    if not items:
        raise raw.RawFormatError(path, 0, None, "no valid items")
    return items


def read_reviews(path, known_items, on_error, report):
    """Reads <Cat>_5.json.gz -> sessions (one reviewer, one UTC day), ordered by first review time.

    The file is read line by line; what is kept per review is a (time, asin) pair whose asin is the
    metadata's own string (`raw.canonical_ids`), so memory grows by that pair per review, not by a line.
    """
    known_items = raw.canonical_ids(known_items)
    clicks = {}  # (reviewer, day) -> [(time, asin)] in file order
    for line, record in raw.json_lines(path, on_error, report, opener=gzip.open):
        reviewer = _field(record, "reviewerID", str, path, line, on_error, report)
        if reviewer is None:
            continue
        asin = _field(record, "asin", str, path, line, on_error, report)
        if asin is None:
            continue
        time = _field(record, "unixReviewTime", int, path, line, on_error, report)
        if time is None:
            continue
        if asin not in known_items:
            error = raw.RawFormatError(path, line, "asin", f"unknown item {asin!r} (not in the metadata)")
            raw.handle_error(error, "unknown_item_click", on_error, report)
            continue
        clicks.setdefault((reviewer, time // SECONDS_PER_DAY), []).append((time, known_items[asin]))
    sessions = []
    for (reviewer, day), reviews in clicks.items():
        reviews.sort(key=_review_time)  # stable: equal times keep file order
        date = datetime.datetime.fromtimestamp(day * SECONDS_PER_DAY, datetime.UTC).date().isoformat()
        sessions.append(raw.Session(f"{reviewer}_{date}", [asin for _, asin in reviews], reviews[0][0]))
    sessions.sort(key=lambda s: (s.timestamp, s.session_id))
    return sessions


def _review_time(review):
    return review[0]


def load(raw_dir, category=None, on_error="raise", report=None):
    """Converts an Amazon 2018 category in `raw_dir` to canonical data.

    Args:
      raw_dir: directory with meta_<Cat>.json.gz, <Cat>_5.json.gz and optionally images/.
      category: <Cat>; None picks the only meta_*.json.gz present.
      on_error: "raise" or "skip" (skips counted in `report`).
      report: raw.SkipReport (a fresh one when None).
    Returns:
      (items, sessions): list[raw.Item] with image paths relative to `raw_dir`, list[raw.Session].
    """
    raw.check_on_error(on_error)
    report = raw.SkipReport() if report is None else report
    category = resolve_category(raw_dir, category)
    items = read_meta(os.path.join(raw_dir, f"meta_{category}.json.gz"), raw_dir, on_error, report)
    sessions = read_reviews(os.path.join(raw_dir, f"{category}_5.json.gz"), {i.item_id for i in items},
                            on_error, report)
    return items, sessions
