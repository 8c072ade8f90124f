"""A split the user gives (split.json) is honoured: hand-made sessions and catalogues, splits written out."""

import json
import os

import pytest

from configs import tpad_base
from tpad_jax.data import prepared, protocol, raw
from tpad_jax.data.raw import Session

TRAIN = [  # given in no particular order; time order is t1, t2, t3, t4, t5
    Session("t4", ["c", "a"], 4),
    Session("t1", ["a", "b", "c", "a"], 1),  # truncated to 3
    Session("t5", ["a", "b"], 5),  # the latest: carved as validation
    Session("t2", ["b", "r", "c"], 2),  # r is rare in train
    Session("t3", ["q", "a"], 3),  # q is rare in train (its test clicks do not count): too short
]
TEST = [
    Session("e1", ["q", "c", "b", "a", "c"], None),  # q unseen in train; longer than 3 but not truncated
    Session("e2", ["d", "a"], 0),  # d unseen: too short
    Session("e3", ["b", "a"], 10),
]
FILTERS = dict(min_item_count=2, min_session_length=2, max_session_length=3, valid_fraction=0.25)


def test_given_train_and_test_with_validation_carved_from_train():
    splits = protocol.split_given({"train": TRAIN, "test": TEST}, **FILTERS)
    assert splits.train == [["a", "b", "c"], ["b", "c"], ["c", "a"]]
    assert splits.valid == [["a", "b"]]
    assert splits.test == [["b", "a"], ["c", "b", "a", "c"]]  # time order: e3, then the untimed e1
    assert splits.stats == {
        "items_below_min_count": 2, "clicks_on_rare_items": 2, "sessions_too_short": 1,
        "sessions_truncated": 1,
        "test_clicks_unseen_in_train": 2, "test_sessions_too_short_after_unseen": 1,
        "valid_clicks_unseen_in_train": 0, "valid_sessions_too_short_after_unseen": 0,
        "train_sessions_left_out": 0,
    }


def test_given_validation_is_used_and_train_is_not_carved():
    valid = [Session("v1", ["a", "z", "b", "c", "a"], 7)]  # z unseen; not truncated either
    splits = protocol.split_given({"train": TRAIN, "valid": valid, "test": TEST}, **FILTERS)
    assert splits.train == [["a", "b", "c"], ["b", "c"], ["c", "a"], ["a", "b"]]
    assert splits.valid == [["a", "b", "c", "a"]]
    assert splits.test == [["b", "a"], ["c", "b", "a", "c"]]
    assert splits.stats["valid_clicks_unseen_in_train"] == 1


def test_given_split_with_train_fraction():
    splits = protocol.split_given({"train": TRAIN, "test": TEST}, train_fraction=0.5, **FILTERS)
    assert splits.train == [["b", "c"], ["c", "a"]]  # round(3 * 0.5) = 2 latest after carving validation
    assert splits.valid == [["a", "b"]] and splits.stats["train_sessions_left_out"] == 1


# --------------------------------------------------------------------------- through load_or_prepare
SESSIONS = [("s1", "abc", 5), ("s2", "bc", 1), ("s3", "cd", 2), ("s4", "ab", 3), ("s5", "dab", 4),
            ("s6", "ea", 6), ("s7", "ac", 0)]
SPLIT = {"train": ["s1", "s2", "s3", "s4"], "test": ["s5", "s7"]}


def write_catalogue(folder, split, titles=True):
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"item_id": i, "title": f"Item {i}" if titles else None} for i in "abcde"]
    sessions = [{"session_id": s, "items": list(clicks), "timestamp": t} for s, clicks, t in SESSIONS]
    for name, records in (("items.jsonl", items), ("sessions.jsonl", sessions)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    if split is not None:
        (folder / "split.json").write_text(json.dumps(split, indent=1))
    return folder


def config_for(folder, **data):
    config = tpad_base.get_config("tiny")
    config.data.update(dict(raw_dir=str(folder), min_item_count=1, valid_fraction=0.25, **data))
    return config


def as_ids(data, split):
    return [[data.item_ids[r] for r in session] for session in getattr(data, split)]


def test_prepared_data_uses_exactly_the_listed_sessions(tmp_path):
    data = prepared.load_or_prepare(config_for(write_catalogue(tmp_path / "cat", SPLIT)), str(tmp_path / "w"))
    # Train in time order s2, s3, s4, s1; the latest quarter (s1) is validation. s6 is not listed.
    assert as_ids(data, "train") == [["b", "c"], ["c", "d"], ["a", "b"]]
    assert as_ids(data, "valid") == [["a", "b", "c"]]
    assert as_ids(data, "test") == [["a", "c"], ["d", "a", "b"]]
    assert data.item_ids == ["a", "b", "c", "d"]  # e occurs only in the unlisted s6
    assert data.stats["split"] == "given by split.json: 4 train / 2 test sessions listed, validation the " \
                                  "latest 0.25 of train"
    assert data.stats["filtering"]["sessions_not_in_split_json"] == 1


def test_listed_id_missing_from_sessions_names_file_line_and_id(tmp_path):
    folder = write_catalogue(tmp_path / "cat", {"train": SPLIT["train"] + ["ghost"], "test": SPLIT["test"]})
    path = os.path.join(folder, "split.json")
    message = (f"^{path}:7: field 'train': session id 'ghost' not in "
               f"{os.path.join(folder, 'sessions.jsonl')}$")
    with pytest.raises(raw.RawFormatError, match=message):
        prepared.load_or_prepare(config_for(folder), str(tmp_path / "w"))
    data = prepared.load_or_prepare(config_for(folder, on_error="skip"), str(tmp_path / "w"))
    assert data.stats["skipped"] == {"split_id_not_in_sessions": 1}
    assert as_ids(data, "test") == [["a", "c"], ["d", "a", "b"]]
    assert data.stats["split"].startswith("given by split.json: 4 train / 2 test sessions listed")


@pytest.mark.parametrize("text, message", [
    ('{"train": ["s1"], "test": ["s5"], "validation": []}', r":1: field 'validation': unknown key"),
    ('{"train": ["s1"]}', r":1: field 'test': missing"),
    ('{"train": "s1", "test": []}', r":1: field 'train': expected a list of session ids, got str"),
    ('{"train": ["s1", 2], "test": []}', r":1: field 'train': expected session id strings, got int"),
    ('{"train": ["s1"],\n "test": ["s5", "s1"]}', r":2: field 'test': session id 's1' listed twice "
                                                   r"\(also in 'train'\)"),
    ('{"train": ["s1", "s2", "s1"], "test": []}', r":1: field 'train': session id 's1' listed twice"),
    ('{"train": ["s1"],\n "test": ["s5",]}', r":2: malformed JSON"),
    ('["s1"]', r":1: expected \{\"train\""),
])
def test_bad_split_files(tmp_path, text, message):
    folder = write_catalogue(tmp_path / "cat", None)
    (folder / "split.json").write_text(text)
    with pytest.raises(raw.RawFormatError, match=r"split\.json" + message):
        prepared.load_or_prepare(config_for(folder), str(tmp_path / "w"))


def test_a_changed_or_removed_split_is_prepared_again(tmp_path):
    folder = write_catalogue(tmp_path / "cat", SPLIT)
    config, workdir = config_for(folder, test_fraction=0.3), str(tmp_path / "w")
    first = prepared.load_or_prepare(config, workdir)
    write_catalogue(folder, {"train": ["s1", "s2", "s3"], "test": ["s4", "s5", "s7"]})
    second = prepared.load_or_prepare(config, workdir)
    assert second.fingerprint != first.fingerprint
    assert as_ids(second, "test") == [["a", "c"], ["a", "b"], ["d", "a", "b"]]
    os.remove(folder / "split.json")
    third = prepared.load_or_prepare(config, workdir)
    assert third.stats["split"] == "by time: the latest 0.3 of the sessions as test"
    assert as_ids(third, "test") == [["a", "b", "c"]]  # s1; s6 [e, a] lost its unseen e
