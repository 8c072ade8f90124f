"""Evaluation protocols: filtering, truncation, the time split and the examples each split yields.

Both protocols (`mmsbr`, the default, and `srgnn`) prepare sessions the same way, in this order:
1. drop items with fewer than `min_item_count` occurrences over all sessions. This is done **once**, as
   the SR-GNN / MMSBR / DIMO preprocessing scripts do, not iterated to a fixed point, so a surviving item
   may end with fewer occurrences after the session filter below;
2. drop sessions shorter than `min_session_length`;
3. truncate sessions to their first `max_session_length` items;
4. order sessions by timestamp (sessions without one after all timed ones; ties by session id in natural
   order, "s2" < "s10") and cut the last `test_fraction` as test;
5. drop test clicks on items never seen in train, then test sessions now shorter than `min_session_length`;
6. validation = the last `valid_fraction` of the train sessions; its clicks on items not in the remaining
   train are dropped the same way, so validation mirrors test.
A given split (split.json, `split_given`) replaces step 4 and keeps each listed session in its split: train
gets steps 1-3 (occurrences counted over train), test and a given validation only step 5; without a
given validation, step 6 carves it from train.
They differ in the examples: `mmsbr` gives one example per session (prefix = all but the last item,
target = the last), `srgnn` every prefix of length >= 1 (prefix augmentation) in every split.
"""

import dataclasses
import re

import numpy as np

from tpad_jax.cli import UserError

PROTOCOLS = ("mmsbr", "srgnn")


@dataclasses.dataclass
class Splits:
    train: list[list[str]]
    valid: list[list[str]]
    test: list[list[str]]
    stats: dict  # what each filtering step removed


def natural_key(text):
    """Sort key that orders embedded numbers by value ("s2" < "s10")."""
    return [int(part) if index % 2 else part for index, part in enumerate(re.split(r"(\d+)", text))]


def time_order_key(session):
    """Sessions by timestamp, untimed ones last, ties by natural session id order."""
    return (session.timestamp is None, session.timestamp or 0, natural_key(session.session_id))


def time_ordered(sessions):
    """`sorted(sessions, key=time_order_key)`, with a natural id key built only for sessions that tie.

    The sort key of every session at once (a tuple and the parts of its id, about 250 bytes) was the
    protocol's peak memory on a catalogue of many sessions; timestamps sort as one int64 array here.
    """
    count = len(sessions)
    try:
        stamps = np.fromiter((s.timestamp or 0 for s in sessions), np.int64, count=count)
    except OverflowError:  # a timestamp beyond int64: the plain sort handles any int
        return sorted(sessions, key=time_order_key)
    untimed = np.fromiter((s.timestamp is None for s in sessions), bool, count=count)
    order = np.lexsort((stamps, untimed))  # stable: sessions that tie stay in file order for now
    stamps, untimed = stamps[order], untimed[order]
    new_run = np.flatnonzero((stamps[1:] != stamps[:-1]) | (untimed[1:] != untimed[:-1])) + 1
    starts, ends = np.concatenate([[0], new_run]), np.concatenate([new_run, [count]])
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        order[start:end] = sorted(order[start:end], key=lambda i: natural_key(sessions[i].session_id))
    return [sessions[i] for i in order]


def count_items(sessions):
    """Occurrences of each item id over `sessions` (lists of item ids)."""
    counts = {}
    for session in sessions:
        for item in session:
            counts[item] = counts.get(item, 0) + 1
    return counts


def _drop_unseen(sessions, seen, min_session_length):
    """Removes clicks on items outside `seen`, then sessions that became too short."""
    kept, clicks_dropped, sessions_dropped = [], 0, 0
    for session in sessions:
        filtered = [item for item in session if item in seen]
        clicks_dropped += len(session) - len(filtered)
        if len(filtered) < min_session_length:
            sessions_dropped += 1
        else:
            kept.append(filtered)
    return kept, clicks_dropped, sessions_dropped


def split_sessions(sessions, *, min_item_count, min_session_length, max_session_length, test_fraction,
                   valid_fraction, train_fraction=1.0):
    """Applies steps 1-6 above to raw sessions, then keeps the latest `train_fraction` of train.

    Args:
      sessions: list[raw.Session].
      train_fraction: in (0, 1]: a low-data study. Only the most recent `train_fraction` of the train
        sessions are kept; validation and test stay exactly those of the full split (not re-filtered),
        so their targets that only the left-out sessions showed become cold items.
    Returns:
      Splits with sessions as lists of item ids, each in time order.
    """
    _check_settings(min_session_length, train_fraction)
    kept, stats = _filter_train(time_ordered(sessions), min_item_count=min_item_count,
                                min_session_length=min_session_length,
                                max_session_length=max_session_length)
    num_test = int(round(len(kept) * test_fraction))
    return _held_out(kept[:len(kept) - num_test], kept[len(kept) - num_test:], None, stats,
                     min_session_length=min_session_length, valid_fraction=valid_fraction,
                     train_fraction=train_fraction)


def split_given(given, *, min_item_count, min_session_length, max_session_length, valid_fraction,
                train_fraction=1.0):
    """Splits of a split the user gave (split.json): its sessions stay in the split that lists them.

    Train gets steps 1-3, with item occurrences counted over the train sessions only (the held-out
    sessions do not decide what train keeps); test, and validation when given, get step 5 only, so their
    targets stay the listed ones (no truncation). Without a given validation, step 6 carves it from
    train. Then `train_fraction` as in `split_sessions`. Every split is in time order.

    Args:
      given: {"train": [raw.Session], "test": [raw.Session]}, optionally "valid".
    Returns:
      Splits with sessions as lists of item ids.
    """
    _check_settings(min_session_length, train_fraction)
    train, stats = _filter_train(time_ordered(given["train"]), min_item_count=min_item_count,
                                 min_session_length=min_session_length,
                                 max_session_length=max_session_length)
    held_out = {name: [session.items for session in time_ordered(given[name])]
                for name in ("valid", "test") if name in given}
    return _held_out(train, held_out["test"], held_out.get("valid"), stats,
                     min_session_length=min_session_length, valid_fraction=valid_fraction,
                     train_fraction=train_fraction)


def _check_settings(min_session_length, train_fraction):
    if min_session_length < 2:
        raise UserError(f"data.min_session_length must be >= 2 (a prefix and a target), "
                        f"got {min_session_length}")
    if not 0.0 < train_fraction <= 1.0:
        raise UserError(f"data.train_fraction must be in (0, 1], got {train_fraction}")


def _filter_train(sessions, *, min_item_count, min_session_length, max_session_length):
    """Steps 1-3 on raw sessions (in the order given): (lists of item ids, stats of what they removed)."""
    counts = count_items([s.items for s in sessions])
    frequent = {item for item, count in counts.items() if count >= min_item_count}
    kept, clicks_rare, sessions_short, truncated = [], 0, 0, 0
    for session in sessions:
        items = [item for item in session.items if item in frequent]
        clicks_rare += len(session.items) - len(items)
        if len(items) < min_session_length:
            sessions_short += 1
            continue
        if len(items) > max_session_length:  # cut in place: one list per session, not two
            truncated += 1
            del items[max_session_length:]
        kept.append(items)
    stats = {
        "items_below_min_count": len(counts) - len(frequent),
        "clicks_on_rare_items": clicks_rare,
        "sessions_too_short": sessions_short,
        "sessions_truncated": truncated,
    }
    return kept, stats


def _held_out(train, test, valid, stats, *, min_session_length, valid_fraction, train_fraction):
    """Steps 5-6 and `train_fraction`: Splits of filtered train and raw test (and valid, or None)."""
    test, test_clicks_unseen, test_sessions_unseen = _drop_unseen(
        test, set(count_items(train)), min_session_length)
    if valid is None:
        num_valid = int(round(len(train) * valid_fraction))
        train, valid = train[:len(train) - num_valid], train[len(train) - num_valid:]
    valid, valid_clicks_unseen, valid_sessions_unseen = _drop_unseen(
        valid, set(count_items(train)), min_session_length)
    num_left_out = len(train) - max(int(round(len(train) * train_fraction)), 1)
    train = train[num_left_out:]
    stats = {
        **stats,
        "test_clicks_unseen_in_train": test_clicks_unseen,
        "test_sessions_too_short_after_unseen": test_sessions_unseen,
        "valid_clicks_unseen_in_train": valid_clicks_unseen,
        "valid_sessions_too_short_after_unseen": valid_sessions_unseen,
        "train_sessions_left_out": num_left_out,
    }
    return Splits(train, valid, test, stats)


def make_examples(sessions, protocol):
    """Prefix/target examples of one split.

    Args:
      sessions: sequences of items (any element type), each of length >= 2.
      protocol: "mmsbr" (one example per session) or "srgnn" (every prefix, shortest first).
    Returns:
      (prefixes, targets): lists, prefixes[i] is a slice of its session, targets[i] its next item.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"data.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    prefixes, targets = [], []
    for session in sessions:
        cuts = range(1, len(session)) if protocol == "srgnn" else [len(session) - 1]
        for cut in cuts:
            prefixes.append(session[:cut])
            targets.append(session[cut])
    return prefixes, targets
