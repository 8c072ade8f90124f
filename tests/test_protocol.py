"""Protocols on hand-made sessions: every filtering step and the exact splits and examples."""

import pytest

from tpad_jax.data import protocol
from tpad_jax.data.raw import Session

SESSIONS = [
    Session("s1", ["a", "b", "c", "a"], 1),  # truncated to 3
    Session("s2", ["b", "r", "c"], 2),  # r is rare
    Session("s10", ["a", "c"], 3),  # same time as s9 and s4: natural id order s4, s9, s10
    Session("s9", ["b", "a"], 3),
    Session("s4", ["q"], 3),  # only a rare item: too short
    Session("s6", ["d", "a", "d"], 4),  # lands in validation; d is unseen in the remaining train
    Session("s7", ["c", "b", "e", "e"], 5),  # test; e is unseen in train
    Session("s3", ["a", "b"], None),  # untimed: last
]


def split():
    return protocol.split_sessions(SESSIONS, min_item_count=2, min_session_length=2, max_session_length=3,
                                   test_fraction=0.3, valid_fraction=0.4)


def test_exact_splits():
    splits = split()
    assert splits.train == [["a", "b", "c"], ["b", "c"], ["b", "a"]]
    assert splits.valid == [["a", "c"]]
    assert splits.test == [["c", "b"], ["a", "b"]]
    assert splits.stats == {
        "items_below_min_count": 2, "clicks_on_rare_items": 2, "sessions_too_short": 1,
        "sessions_truncated": 2,
        "test_clicks_unseen_in_train": 1, "test_sessions_too_short_after_unseen": 0,
        "valid_clicks_unseen_in_train": 2, "valid_sessions_too_short_after_unseen": 1,
        "train_sessions_left_out": 0,
    }


def test_train_fraction_keeps_the_latest_train_sessions_and_the_full_valid_and_test():
    full = split()
    low = protocol.split_sessions(SESSIONS, min_item_count=2, min_session_length=2, max_session_length=3,
                                  test_fraction=0.3, valid_fraction=0.4, train_fraction=0.5)
    assert low.train == [["b", "c"], ["b", "a"]]  # round(3 * 0.5) = 2 latest of the three
    assert (low.valid, low.test) == (full.valid, full.test)
    assert low.stats["train_sessions_left_out"] == 1
    tiny = protocol.split_sessions(SESSIONS, min_item_count=2, min_session_length=2, max_session_length=3,
                                   test_fraction=0.3, valid_fraction=0.4, train_fraction=0.01)
    assert tiny.train == [["b", "a"]]  # never empty
    with pytest.raises(ValueError, match="train_fraction"):
        protocol.split_sessions(SESSIONS, min_item_count=2, min_session_length=2, max_session_length=3,
                                test_fraction=0.3, valid_fraction=0.4, train_fraction=0.0)


def test_mmsbr_examples_one_per_session():
    prefixes, targets = protocol.make_examples(split().train, "mmsbr")
    assert prefixes == [["a", "b"], ["b"], ["b"]] and targets == ["c", "c", "a"]


def test_srgnn_examples_every_prefix():
    prefixes, targets = protocol.make_examples(split().train, "srgnn")
    assert prefixes == [["a"], ["a", "b"], ["b"], ["b"]] and targets == ["b", "c", "c", "a"]


def test_natural_order():
    ids = ["s10", "s9", "a2b", "a10b", "s100"]
    assert sorted(ids, key=protocol.natural_key) == ["a2b", "a10b", "s9", "s10", "s100"]


def test_bad_protocol_settings():
    with pytest.raises(ValueError, match="data.protocol"):
        protocol.make_examples([["a", "b"]], "gru")
    with pytest.raises(ValueError, match="min_session_length"):
        protocol.split_sessions(SESSIONS, min_item_count=1, min_session_length=1, max_session_length=3,
                                test_fraction=0.1, valid_fraction=0.1)


def test_time_order_is_timestamp_then_natural_id_with_untimed_last():
    sessions = [Session("s10", ["a"], 5), Session("s9", ["a"], None), Session("s2", ["a"], 5),
                Session("a", ["a"], -1), Session("s1", ["a"], None), Session("s11", ["a"], 5)]
    assert [s.session_id for s in protocol.time_ordered(sessions)] == ["a", "s2", "s10", "s11", "s1", "s9"]
    # A timestamp beyond int64 still sorts (the plain sort path).
    sessions.append(Session("b", ["a"], 2**70))
    assert [s.session_id for s in protocol.time_ordered(sessions)] == ["a", "s2", "s10", "s11", "b", "s1", "s9"]
