"""Adapters on their fixtures: Amazon Review Data 2018 and SR-GNN pickles."""

import gzip
import os
import pickle
import shutil

import pytest

from tpad_jax import cli
from tpad_jax.data import amazon2018, raw, srgnn_pickle

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
AMAZON = os.path.join(FIXTURES, "amazon2018")
SRGNN = os.path.join(FIXTURES, "srgnn")


def test_amazon_items_and_sessions():
    items, sessions = amazon2018.load(AMAZON)  # category found from the only meta_*.json.gz
    image = os.path.join("images", "{}")
    assert items == [
        raw.Item("B00004U9UY", "Foaming Face Wash, 6.7 fl oz", "Face", image.format("B00004U9UY.jpg")),
        raw.Item("B00004U9V2", "Daily Moisturizing Lotion SPF 15", "Moisturizers", None),
        raw.Item("B0000530HU", "Eau de Toilette Spray 1.7 oz", None, image.format("B0000530HU.png")),
        raw.Item("B00006L9LC", "Volumizing Shampoo", "Shampoo", None),
        raw.Item("B00008MOQA", "Repair Conditioner", "Conditioner", None),
    ]
    # One reviewer on one UTC day; equal times keep file order; sessions ordered by time.
    assert sessions == [
        raw.Session("A1V6B6TNIC10QE_2013-11-13", ["B00008MOQA"], 1384300800),
        raw.Session("A1V6B6TNIC10QE_2013-11-14", ["B00006L9LC", "B00004U9UY"], 1384387200),
        raw.Session("A2KBV88FL48CFS_2015-02-03", ["B00006L9LC"], 1422921600),
        raw.Session("A3CIUOJXQ5VDQ2_2016-09-01", ["B0000530HU", "B00004U9UY", "B00004U9V2"], 1472688000),
    ]
    # A review keeps the metadata's own asin string (a pointer), not the string parsed from its line.
    ids = {item.item_id: item.item_id for item in items}
    assert all(click is ids[click] for session in sessions for click in session.items)


def copy_with_extra_lines(tmp_path, meta_lines=(), review_lines=()):
    """The fixture folder with lines appended to the gzipped meta and review files."""
    target = tmp_path / "amazon"
    shutil.copytree(AMAZON, target)
    for name, extra in (("meta_All_Beauty.json.gz", meta_lines), ("All_Beauty_5.json.gz", review_lines)):
        with gzip.open(target / name, "rt", encoding="utf-8") as f:
            text = f.read()
        with gzip.open(target / name, "wt", encoding="utf-8") as f:
            f.write(text + "".join(line + "\n" for line in extra))
    return str(target)


def test_amazon_python_literal_line_is_reported_never_evaluated(tmp_path):
    # The published dumps contain lines like this; evaluating it would run code.
    evil = "{'asin': 'B0EVIL', 'title': __import__('os').getcwd()}"
    folder = copy_with_extra_lines(tmp_path, meta_lines=[evil])
    with pytest.raises(raw.RawFormatError, match=r"meta_All_Beauty.json.gz:6: malformed JSON"):
        amazon2018.load(folder, "All_Beauty")
    report = raw.SkipReport()
    items, _ = amazon2018.load(folder, "All_Beauty", on_error="skip", report=report)
    assert len(items) == 5 and report.as_dict() == {"malformed_json": 1}


def test_amazon_bad_records_are_counted(tmp_path):
    folder = copy_with_extra_lines(
        tmp_path,
        meta_lines=['{"asin": "B0NOTITLE", "title": "", "category": ["A"]}',
                    '{"asin": "B00006L9LC", "title": "Duplicate", "category": ["A"]}'],
        review_lines=['{"reviewerID": "R1", "asin": "B0UNKNOWN", "unixReviewTime": 1500000000}',
                      '{"reviewerID": "R1", "asin": "B00006L9LC", "unixReviewTime": "soon"}'])
    with pytest.raises(raw.RawFormatError, match="field 'title'"):
        amazon2018.load(folder)
    report = raw.SkipReport()
    items, sessions = amazon2018.load(folder, on_error="skip", report=report)
    assert len(items) == 5 and len(sessions) == 4
    assert report.as_dict() == {"duplicate_item_id": 1, "missing_title": 1, "unknown_item_click": 1,
                                "wrong_type": 1}


def test_amazon_category_must_be_named_when_ambiguous(tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(AMAZON, folder)
    shutil.copy(folder / "meta_All_Beauty.json.gz", folder / "meta_Other.json.gz")
    with pytest.raises(cli.UserError, match="amazon_category"):
        amazon2018.load(str(folder))


def test_srgnn_pickles_load_as_given():
    items, train, test = srgnn_pickle.load(SRGNN)
    assert [i.item_id for i in items] == ["1", "2", "3", "4", "5"]
    assert items[0] == raw.Item("1", "item 1", None, None)
    assert train.prefixes == [["1"], ["1", "2"], ["3"], ["3", "4"], ["2"]]
    assert train.targets == ["2", "3", "4", "5", "5"]
    assert (test.prefixes, test.targets) == ([["1"], ["4", "5"]], ["3", "2"])


class Exploit:
    """Unpickling this would call os.system if globals were allowed."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [([[1]], [Exploit()]), ([[1]], [{1, 2}.__class__([3])])],
                         ids=["reduce-to-os.system", "set-class"])
def test_srgnn_unpickler_refuses_globals(tmp_path, payload):
    path = tmp_path / "train.txt"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(raw.RawFormatError, match="refusing to load global"):
        srgnn_pickle.read_examples(str(path))


def test_srgnn_bad_structure(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(pickle.dumps(([[1], [2]], [3])))
    with pytest.raises(raw.RawFormatError, match="2 sequences but 1 targets"):
        srgnn_pickle.read_examples(str(path))
    path.write_bytes(pickle.dumps(([[1], [2.5]], [3, 4])))
    with pytest.raises(raw.RawFormatError, match=r"train.txt:2: field 'sequences': expected an int item id"):
        srgnn_pickle.read_examples(str(path))
    path.write_bytes(b"not a pickle")
    with pytest.raises(raw.RawFormatError, match="not a valid session pickle"):
        srgnn_pickle.read_examples(str(path))


def test_amazon_truncated_gzip_names_file_and_line(tmp_path):
    folder = tmp_path / "amazon"
    shutil.copytree(AMAZON, folder)
    meta = folder / "meta_All_Beauty.json.gz"
    meta.write_bytes(meta.read_bytes()[:-8])  # the stream loses its trailer, as in an interrupted download
    with pytest.raises(raw.RawFormatError, match=r"meta_All_Beauty.json.gz:6: truncated or corrupt compressed"):
        amazon2018.load(str(folder))
    report = raw.SkipReport()
    items, _ = amazon2018.load(str(folder), on_error="skip", report=report)
    assert len(items) == 5 and report.as_dict() == {"truncated_file": 1}
