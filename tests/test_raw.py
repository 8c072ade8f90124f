"""Canonical format readers: one test per bad-input case, plus writer round trips."""

import codecs
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from tpad_jax.data import raw

GOOD_ITEM = {"item_id": "a", "title": "Red mug", "category": "mug", "image": None}


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_one_bad_item(tmp_path, bad):
    """Reads [good, bad, good'] in both modes; returns the raised error and the skip report."""
    path = write_lines(tmp_path / "items.jsonl", [GOOD_ITEM, bad, {**GOOD_ITEM, "item_id": "z"}])
    with pytest.raises(raw.RawFormatError) as error:
        raw.read_items(path, on_error="raise")
    report = raw.SkipReport()
    items = raw.read_items(path, on_error="skip", report=report)
    assert [i.item_id for i in items] == ["a", "z"]
    return error.value, report.as_dict()


def test_clicks_are_the_item_tables_strings_not_one_per_click(tmp_path):
    items = raw.read_items(write_lines(tmp_path / "items.jsonl", [GOOD_ITEM, {**GOOD_ITEM, "item_id": "b"}]))
    path = write_lines(tmp_path / "sessions.jsonl", [{"session_id": f"s{k}", "items": ["a", "b", "a"]}
                                                      for k in range(3)])
    sessions = raw.read_sessions(path, {item.item_id for item in items})
    ids = {item.item_id: item.item_id for item in items}
    # Each click JSON parses is a new string; the reader keeps the item table's instead (a pointer each).
    assert [s.items for s in sessions] == [["a", "b", "a"]] * 3
    assert all(click is ids[click] for session in sessions for click in session.items)


def test_error_message_names_file_line_and_field():
    error = raw.RawFormatError("items.jsonl", 17, "title", "missing")
    assert str(error) == "items.jsonl:17: field 'title': missing"


def test_malformed_json(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, '{"item_id": "b", "title": ')
    assert (error.line, error.field) == (2, None) and "malformed JSON" in str(error)
    assert skipped == {"malformed_json": 1}


def test_missing_title(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, {"item_id": "b", "category": None})
    assert (error.line, error.field, error.message) == (2, "title", "missing")
    assert skipped == {"missing_field": 1}


def test_empty_title(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, {"item_id": "b", "title": "  "})
    assert (error.line, error.field) == (2, "title")
    assert skipped == {"missing_title": 1}


def test_wrong_type(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, {"item_id": 7, "title": "Seven"})
    assert (error.line, error.field) == (2, "item_id") and "expected string, got int" in str(error)
    assert skipped == {"wrong_type": 1}


def test_duplicate_item_id(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, {**GOOD_ITEM, "title": "Again"})
    assert (error.line, error.field) == (2, "item_id") and "duplicate" in str(error)
    assert skipped == {"duplicate_item_id": 1}


def test_missing_image(tmp_path):
    error, skipped = read_one_bad_item(tmp_path, {"item_id": "b", "title": "B", "image": "images/none.jpg"})
    assert (error.line, error.field) == (2, "image") and "does not exist" in str(error)
    assert skipped == {"image_missing": 1}


def test_undecodable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    error, skipped = read_one_bad_item(tmp_path, {"item_id": "b", "title": "B", "image": "broken.jpg"})
    assert (error.line, error.field) == (2, "image") and "cannot be decoded" in str(error)
    assert skipped == {"image_unreadable": 1}


def test_good_image_is_kept_relative(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "images" / "b.png")
    path = write_lines(tmp_path / "items.jsonl", [{"item_id": "b", "title": "B", "image": "images/b.png"}])
    assert raw.read_items(path) == [raw.Item("b", "B", None, "images/b.png")]


@pytest.mark.parametrize("name", ["items.jsonl", "sessions.jsonl"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n")
    with pytest.raises(raw.RawFormatError, match="empty file"):
        if name == "items.jsonl":
            raw.read_items(path, on_error="skip")
        else:
            raw.read_sessions(path, {"a"}, on_error="skip")


def test_unknown_item_in_session_drops_the_click(tmp_path):
    path = write_lines(tmp_path / "sessions.jsonl", [
        {"session_id": "s1", "items": ["a", "ghost", "b", "ghost"], "timestamp": 5},
        {"session_id": "s2", "items": ["b", "a"]},
    ])
    with pytest.raises(raw.RawFormatError) as error:
        raw.read_sessions(path, {"a", "b"})
    assert (error.value.line, error.value.field) == (1, "items") and "ghost" in str(error.value)
    report = raw.SkipReport()
    sessions = raw.read_sessions(path, {"a", "b"}, on_error="skip", report=report)
    assert sessions == [raw.Session("s1", ["a", "b"], 5), raw.Session("s2", ["b", "a"], None)]
    assert report.as_dict() == {"unknown_item_click": 2}


def test_session_wrong_types(tmp_path):
    path = write_lines(tmp_path / "sessions.jsonl", [
        {"session_id": "s1", "items": ["a"], "timestamp": "yesterday"},
        {"session_id": "s2", "items": "a"},
        {"session_id": "s3", "items": ["a"], "timestamp": True},
        {"session_id": "s4", "items": ["a", 3]},
        {"session_id": "s5", "items": ["a", "a"], "timestamp": 9},
    ])
    with pytest.raises(raw.RawFormatError, match="sessions.jsonl:1: field 'timestamp': expected int, got"):
        raw.read_sessions(path, {"a"})
    report = raw.SkipReport()
    sessions = raw.read_sessions(path, {"a"}, on_error="skip", report=report)
    assert sessions == [raw.Session("s5", ["a", "a"], 9)]
    assert report.as_dict() == {"wrong_type": 4}


def test_items_round_trip(tmp_path):
    items = [raw.Item("a", "Red mug", "mug", None), raw.Item("b", "Été lamp", None, None)]
    raw.write_items(tmp_path / "items.jsonl", items)
    assert raw.read_items(tmp_path / "items.jsonl") == items
    sessions = [raw.Session("s1", ["a", "b", "a"], 3), raw.Session("s2", ["b", "a"], None)]
    raw.write_sessions(tmp_path / "sessions.jsonl", sessions)
    assert raw.read_sessions(tmp_path / "sessions.jsonl", {"a", "b"}) == sessions


def test_write_npz_is_byte_identical_and_loadable(tmp_path):
    arrays = {"b": np.arange(5, dtype=np.int32), "a": np.array(["x", "yz"])}
    raw.write_npz(tmp_path / "1.npz", arrays)
    raw.write_npz(tmp_path / "2.npz", arrays)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    with np.load(tmp_path / "1.npz") as loaded:
        np.testing.assert_array_equal(loaded["b"], arrays["b"])
        np.testing.assert_array_equal(loaded["a"], arrays["a"])


def test_on_error_must_be_known(tmp_path):
    path = write_lines(tmp_path / "items.jsonl", [GOOD_ITEM])
    with pytest.raises(ValueError, match="on_error"):
        raw.read_items(path, on_error="ignore")


def test_bom_crlf_and_blank_lines_read_as_plain_lines(tmp_path):
    # Spreadsheet exports write a UTF-8 byte-order mark and CRLF line ends.
    items = [raw.Item("a", "Été mug", None, None), raw.Item("b", "Lamp", "home", None)]
    lines = "\r\n\r\n".join(json.dumps(dataclasses.asdict(item), ensure_ascii=False) for item in items)
    (tmp_path / "items.jsonl").write_bytes(codecs.BOM_UTF8 + lines.encode() + b"\r\n")
    assert raw.read_items(tmp_path / "items.jsonl") == items
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_bytes(codecs.BOM_UTF8 + b'\r\n{"session_id": "s", "items": ["a", "b"]}\r\n')
    assert raw.read_sessions(sessions, {"a", "b"}) == [raw.Session("s", ["a", "b"], None)]


def test_byte_that_is_not_utf8_names_line_and_column(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "caf\xe9"}\n'
                     b'{"item_id": "c", "title": "C"}\n')
    with pytest.raises(raw.RawFormatError, match=r"items.jsonl:2: not UTF-8: byte 0xe9 at column 31$"):
        raw.read_items(path)
    report = raw.SkipReport()
    assert [i.item_id for i in raw.read_items(path, on_error="skip", report=report)] == ["a", "c"]
    assert report.as_dict() == {"not_utf8": 1}


@pytest.mark.parametrize("ending", [b"", b"\n"])
def test_json_lines_policies_on_a_torn_last_line(tmp_path, ending):
    # A process killed while appending leaves a last line without its newline; only that one is torn.
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n[2]\n{"step": 3, "lo' + ending)
    with pytest.raises(raw.RawFormatError, match=r"metrics.jsonl:2: expected a JSON object$"):
        list(raw.json_lines(path))
    report = raw.SkipReport()
    assert list(raw.json_lines(path, "skip", report)) == [(1, {"step": 1})]
    assert report.as_dict() == {"malformed_json": 1, "wrong_type": 1}
    path.write_bytes(b'{"step": 1}\n{"step": 3, "lo' + ending)
    if ending:
        with pytest.raises(raw.RawFormatError, match=r"metrics.jsonl:2: malformed JSON"):
            list(raw.json_lines(path, "tolerate_torn_end"))
    else:
        assert list(raw.json_lines(path, "tolerate_torn_end")) == [(1, {"step": 1})]


def test_a_file_of_skipped_lines_is_not_empty(tmp_path):
    path = write_lines(tmp_path / "sessions.jsonl", ["[1]"])
    report = raw.SkipReport()
    assert raw.read_sessions(path, {"a"}, on_error="skip", report=report) == []
    assert report.as_dict() == {"wrong_type": 1}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(raw.RawFormatError, match=r"items.jsonl: no such file$"):
        raw.read_items(tmp_path / "items.jsonl")


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_image_outside_the_catalogue_is_refused(tmp_path, how):
    catalogue = tmp_path / "catalogue"
    (catalogue / "images").mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")
    image = "../secret.png"
    if how == "symlink":
        (catalogue / "images" / "b.png").symlink_to(tmp_path / "secret.png")
        image = "images/b.png"
    error, skipped = read_one_bad_item(catalogue, {"item_id": "b", "title": "B", "image": image})
    assert (error.line, error.field) == (2, "image") and "outside the catalogue" in str(error)
    assert skipped == {"image_outside_catalogue": 1}


def test_symlink_inside_the_catalogue_is_kept(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "real.png")
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "images" / "real.png")
    path = write_lines(tmp_path / "items.jsonl", [{"item_id": "b", "title": "B", "image": "images/b.png"}])
    assert raw.read_items(path) == [raw.Item("b", "B", None, "images/b.png")]
