"""load_or_prepare end to end: synthetic, canonical, Amazon and SR-GNN sources; files, reload, statistics."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax.data import prepared, raw

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def synthetic_config():
    config = tpad_base.get_config("tiny")
    config.data.synthetic.num_items = 40
    config.data.synthetic.num_sessions = 400
    config.data.image_size = 8
    return config


def fixture_config(folder, **overrides):
    config = tpad_base.get_config("tiny")
    config.data.raw_dir = os.path.join(FIXTURES, folder)
    for key, value in overrides.items():
        config.data[key] = value
    return config


def prepared_bytes(workdir):
    folder = os.path.join(workdir, "data", "prepared")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_synthetic_prepare_is_deterministic_and_loaded_back(tmp_path, monkeypatch):
    config = synthetic_config()
    data = prepared.load_or_prepare(config, str(tmp_path / "a"))
    prepared.load_or_prepare(config, str(tmp_path / "b"))
    files = prepared_bytes(tmp_path / "a")
    assert sorted(files) == ["catalogue.json", "fingerprint.txt", "splits.npz", "stats.json"]
    assert files == prepared_bytes(tmp_path / "b")
    assert files["fingerprint.txt"].decode().strip() == data.fingerprint

    def fail(*args):
        raise AssertionError("prepared again although the files are current")

    monkeypatch.setattr(prepared, "prepare", fail)
    again = prepared.load_or_prepare(config, str(tmp_path / "a"))
    assert again.fingerprint == data.fingerprint and again.item_ids == data.item_ids
    for split in prepared.SPLITS:
        for mine, theirs in zip(getattr(again, split), getattr(data, split)):
            np.testing.assert_array_equal(mine, theirs)


def test_changed_data_config_prepares_again(tmp_path):
    config = synthetic_config()
    first = prepared.load_or_prepare(config, str(tmp_path))
    config.data.max_session_length = 2
    second = prepared.load_or_prepare(config, str(tmp_path))
    assert second.fingerprint != first.fingerprint
    assert max(len(s) for s in second.train) == 2


def test_synthetic_contents_and_statistics(tmp_path):
    data = prepared.load_or_prepare(synthetic_config(), str(tmp_path))
    assert data.raw_dir == os.path.join(str(tmp_path), "data", "raw")
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in data.image_paths) and data.has_image.all()
    assert len(data.titles) == len(data.categories) == data.num_items
    for split in prepared.SPLITS:
        sessions = getattr(data, split)
        prefixes, targets = data.examples(split)
        assert all(s.dtype == np.int32 and len(s) >= 2 for s in sessions) and targets.dtype == np.int32
        # mmsbr: one example per session, prefix = all but the last item.
        assert len(prefixes) == len(sessions)
        for s, p, t in zip(sessions, prefixes, targets):
            np.testing.assert_array_equal(p, s[:-1])
            assert t == s[-1]
    counts = np.bincount(np.concatenate(data.train), minlength=data.num_items)
    np.testing.assert_array_equal(data.train_item_counts, counts)
    targets = data.examples("test")[1]
    np.testing.assert_array_equal(data.cold_mask(targets), counts[targets] < 10)
    stats = data.stats
    assert stats["source"] == "synthetic" and stats["items"] == data.num_items
    assert stats["sessions"] == {split: len(getattr(data, split)) for split in prepared.SPLITS}
    assert stats["cold_target_share_test"] == round(float(np.mean(counts[targets] < 10)), 4)
    assert stats["skipped"] == {}
    assert data.oracle_scores("valid").shape == (len(data.valid), data.num_items)


def test_canonical_text_catalogue_srgnn_protocol(tmp_path):
    data = prepared.load_or_prepare(fixture_config("text_catalogue", protocol="srgnn"), str(tmp_path))
    assert data.stats["source"] == "canonical" and data.num_items == 60
    assert data.image_paths == [None] * 60 and not data.has_image.any()
    assert data.oracle_scores("test") is None
    prefixes, targets = data.examples("train")
    assert len(targets) == sum(len(s) - 1 for s in data.train)
    np.testing.assert_array_equal(prefixes[0], data.train[0][:1])
    assert data.stats["sessions"]["test"] == 40 and data.stats["avg_session_length"]["train"] > 2


def test_skips_are_counted_in_statistics(tmp_path):
    folder = tmp_path / "catalogue"
    shutil.copytree(os.path.join(FIXTURES, "text_catalogue"), folder)
    with open(folder / "sessions.jsonl", "a", encoding="utf-8") as f:
        f.write('{"session_id": "bad", "items": ["t00", "nope", "t01"], "timestamp": 1}\n{"oops"\n')
    config = tpad_base.get_config("tiny")
    config.data.raw_dir = str(folder)
    with pytest.raises(raw.RawFormatError, match="sessions.jsonl:401: field 'items': unknown item 'nope'"):
        prepared.load_or_prepare(config, str(tmp_path / "work"))
    config.data.on_error = "skip"
    data = prepared.load_or_prepare(config, str(tmp_path / "work"))
    assert data.stats["skipped"] == {"malformed_json": 1, "unknown_item_click": 1}


def test_amazon_source(tmp_path):
    config = fixture_config("amazon2018", source="amazon2018", min_item_count=1, test_fraction=0.5,
                            valid_fraction=0.0)
    data = prepared.load_or_prepare(config, str(tmp_path))
    # Sessions of length >= 2: A1V6..._2013-11-14 (train) and A3CI..._2016-09-01 (test, unseen items dropped).
    assert [[data.item_ids[r] for r in s] for s in data.train] == [["B00006L9LC", "B00004U9UY"]]
    assert len(data.test) == 0 and data.stats["filtering"]["test_clicks_unseen_in_train"] == 2
    assert data.has_image.tolist() == [item == "B00004U9UY" for item in data.item_ids]
    assert data.stats["source"] == "amazon2018"


def test_srgnn_pickles_used_as_given(tmp_path):
    config = fixture_config("srgnn", source="srgnn_pickle", protocol="srgnn", valid_fraction=0.4)
    data = prepared.load_or_prepare(config, str(tmp_path))
    assert data.item_ids == ["1", "2", "3", "4", "5"]

    def as_ids(prefixes, targets):
        return [[data.item_ids[r] for r in p] for p in prefixes], [data.item_ids[t] for t in targets]

    assert as_ids(*data.examples("train")) == ([["1"], ["1", "2"], ["3"]], ["2", "3", "4"])
    assert as_ids(*data.examples("valid")) == ([["3", "4"], ["2"]], ["5", "5"])
    assert as_ids(*data.examples("test")) == ([["1"], ["4", "5"]], ["3", "2"])
    np.testing.assert_array_equal(data.train_item_counts, [2, 2, 2, 1, 0])
    with pytest.raises(ValueError, match="protocol='srgnn'"):
        prepared.load_or_prepare(fixture_config("srgnn", source="srgnn_pickle"), str(tmp_path / "m"))


def test_stats_file_is_plain_json(tmp_path):
    prepared.load_or_prepare(fixture_config("text_catalogue"), str(tmp_path))
    with open(tmp_path / "data" / "prepared" / "stats.json", encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["examples"]["test"] == stats["sessions"]["test"] and stats["protocol"] == "mmsbr"
