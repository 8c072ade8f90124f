"""TFDS item table and Grain pipelines on a hand-made PreparedData stand-in with tiny PNGs."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tpad_jax.data import pipeline, prepared, prompts, tfds_builder, tokenizer as tokenizer_lib

N_IMG = 2
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), None, (10, 20, 30), (200, 200, 0), None]
TITLES = ["red thing", "green thing", "blue thing", "plain note", "dark box", "yellow cup", "quiet song"]
CATEGORIES = ["toys", "toys", None, "books", "boxes", None, "music"]


def _config(**data_overrides):
    spec = importlib.util.spec_from_file_location(
        "tpad_base", Path(__file__).resolve().parents[1] / "configs" / "tpad_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.image_size = 4
    config.data.max_item_tokens = 16
    config.data.max_title_tokens = 3
    config.data.visual_tokens_per_item = 2
    config.data.max_prompt_items = 2
    config.data.update(data_overrides)
    return config


def _fake_data(workdir, train=((0, 1, 2), (3, 4), (5, 6, 0, 1)), fingerprint="v1", titles=TITLES):
    """A PreparedData stand-in: solid-colour PNGs (odd sizes) and explicit eval examples."""
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for row, colour in enumerate(COLOURS):
        path = None
        if colour is not None:
            path = workdir / "images" / f"{row}.png"
            Image.new("RGB", (5 + row, 3 + row), colour).save(path)
        paths.append(None if path is None else str(path))
    valid_prefixes = [np.array([2, 3], np.int32), np.array([6], np.int32)]
    return SimpleNamespace(
        workdir=workdir, num_items=len(TITLES), item_ids=[f"item{row}" for row in range(len(TITLES))],
        titles=list(titles), categories=CATEGORIES, image_paths=paths,
        has_image=np.array([c is not None for c in COLOURS]), fingerprint=fingerprint,
        train=[np.array(s, np.int32) for s in train], valid=[], test=[],
        examples=lambda split: (valid_prefixes, np.array([4, 5], np.int32)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    data = _fake_data(workdir)
    tokenizer = tokenizer_lib.train_tokenizer(TITLES + [c for c in CATEGORIES if c], 300,
                                              workdir / "data" / "tokenizer.json")
    return data, tokenizer


def _expected_pixels(row, size=4):
    colour = COLOURS[row]
    if colour is None:
        return np.zeros((size, size, 3), np.float32)
    return np.broadcast_to(np.array(colour, np.float32) / 127.5 - 1.0, (size, size, 3))


def test_item_table_round_trip_without_tensorflow(tmp_path):
    data = _fake_data(tmp_path)
    source = tfds_builder.item_table(data, tmp_path)
    assert len(source) == len(TITLES)
    for row, colour in enumerate(COLOURS):
        record = source[row]
        assert (record["row"], record["item_id"], record["title"]) == (row, f"item{row}".encode(),
                                                                       TITLES[row].encode())
        assert record["category"] == (CATEGORIES[row] or "").encode()
        assert record["has_image"] == (colour is not None)
        stored = Image.open(data.image_paths[row]) if colour else Image.new("RGB", (1, 1))
        np.testing.assert_array_equal(record["image"], np.asarray(stored))
    # Same fingerprint: kept as is; a new fingerprint rebuilds from the new data.
    renamed = _fake_data(tmp_path, fingerprint="v2", titles=["renamed"] + TITLES[1:])
    assert tfds_builder.item_table(renamed, tmp_path)[0]["title"] == b"renamed"
    assert "tensorflow" not in sys.modules


def test_unreadable_image_names_the_file_and_item(tmp_path):
    data = _fake_data(tmp_path)
    Path(data.image_paths[1]).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"1\.png: field 'image' of item 'item1'"):
        tfds_builder.item_table(data, tmp_path)


def test_export_item_batches_cover_every_item_once(setup):
    data, tokenizer = setup
    config = _config()
    batches = list(pipeline.item_batches(config, data, tokenizer, N_IMG, 3, shuffle=False, repeat=False,
                                         seed=0))
    assert len(batches) == 3
    rows = np.concatenate([b["rows"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0]
    assert valid.tolist() == [True] * 7 + [False] * 2
    assert not batches[-1]["loss_mask"][1:].any()
    vocab = prompts.prompt_vocab(tokenizer)
    length = prompts.item_prompt_length(N_IMG, config.data.max_item_tokens)
    for batch in batches:
        assert batch["tokens"].shape == (3, length) and batch["tokens"].dtype == np.int32
        assert batch["pixels"].shape == (3, 4, 4, 3) and batch["pixels"].dtype == np.float32
        for i, row in enumerate(batch["rows"]):
            title, category = tokenizer_lib.encode(
                tokenizer, [prompts.title_text(TITLES[row]), prompts.title_text(CATEGORIES[row] or "")])
            expected = prompts.item_prompt(vocab, title, category if CATEGORIES[row] else [],
                                           COLOURS[row] is not None, n_img=N_IMG,
                                           max_item_tokens=config.data.max_item_tokens)
            np.testing.assert_array_equal(batch["tokens"][i], expected["tokens"])
            np.testing.assert_array_equal(batch["attention_mask"][i], expected["attention_mask"])
            assert batch["item_pos"][i] == expected["item_pos"]
            assert batch["has_image"][i] == (COLOURS[row] is not None)
            np.testing.assert_allclose(batch["pixels"][i], _expected_pixels(row), atol=1e-6)


def test_item_batches_of_some_rows_read_those_items_only(setup):
    data, tokenizer = setup
    batches = list(pipeline.item_batches(_config(), data, tokenizer, N_IMG, 2, shuffle=False, repeat=False,
                                         seed=0, rows=np.array([1, 4, 6])))
    rows = np.concatenate([b["rows"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert rows.tolist() == [1, 4, 6, 1] and valid.tolist() == [True, True, True, False]
    for batch in batches:
        for i, row in enumerate(batch["rows"]):
            assert batch["has_image"][i] == (COLOURS[row] is not None)
            np.testing.assert_allclose(batch["pixels"][i], _expected_pixels(row), atol=1e-6)


def test_process_slices_are_disjoint_and_cover_the_items(setup):
    data, tokenizer = setup
    per_process = []
    for process_index in (0, 1):
        batches = list(pipeline.item_batches(_config(), data, tokenizer, N_IMG, 2, shuffle=True,
                                             repeat=False, seed=3, process_index=process_index,
                                             process_count=2))
        per_process.append([(row, valid) for b in batches for row, valid in zip(b["rows"], b["valid"])])
    assert len(per_process[0]) == len(per_process[1]) == 4
    valid_rows = [{row for row, valid in rows if valid} for rows in per_process]
    assert not valid_rows[0] & valid_rows[1]
    assert valid_rows[0] | valid_rows[1] == set(range(7))
    assert sum(valid for rows in per_process for _, valid in rows) == 7


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("worker_count", [0, 1])
def test_iterator_state_resumes_mid_epoch(setup, worker_count):
    data, tokenizer = setup
    config = _config(worker_count=worker_count)

    def training_batches():
        return pipeline.item_batches(config, data, tokenizer, N_IMG, 3, shuffle=True, repeat=True, seed=1)

    iterator = training_batches()
    seen = [next(iterator) for _ in range(3)]  # 9 rows: past the first epoch of 7
    state = iterator.get_state()
    expected = next(iterator)
    resumed = training_batches()
    resumed.set_state(state)
    _assert_batches_equal(next(resumed), expected)
    # Every epoch is a permutation of the items, reshuffled.
    rows = np.concatenate([b["rows"] for b in seen + [expected]]).tolist()
    assert sorted(rows[:7]) == list(range(7))
    assert all(b["valid"].all() for b in seen)


@pytest.mark.parametrize("worker_count", [0, 1])
def test_train_session_batches_use_every_position(setup, worker_count):
    data, tokenizer = setup
    config = _config(worker_count=worker_count)
    batches = list(pipeline.session_batches(config, data, tokenizer, "train", 4, shuffle=False,
                                            repeat=False, seed=0))
    # Sessions (0 1 2), (3 4), (5 6 0 1): targets at positions 1.. give 2 + 1 + 3 = 6 examples.
    assert len(batches) == 2
    merged = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    assert merged["target"].tolist() == [1, 2, 4, 6, 0, 1, 1, 1]  # fillers copy example 0
    assert merged["valid"].tolist() == [True] * 6 + [False] * 2
    # S = 2: the last two items of the prefix, left-aligned, and the item after each.
    assert merged["rows"][:6].tolist() == [[0, 0], [0, 1], [3, 0], [5, 0], [5, 6], [6, 0]]
    assert merged["row_mask"][:6].tolist() == [[True, False], [True, True], [True, False], [True, False],
                                               [True, True], [True, True]]
    assert merged["next_rows"][:6].tolist() == [[1, 0], [1, 2], [4, 0], [6, 0], [6, 0], [0, 1]]
    vocab = prompts.prompt_vocab(tokenizer)
    titles = tokenizer_lib.encode(tokenizer, [prompts.title_text(t) for t in TITLES])
    expected = prompts.session_prompt(vocab, [titles[6], titles[0]], [False, True], titles[1], m=2,
                                      max_title_tokens=3, max_prompt_items=2)
    for key in ("tokens", "attention_mask", "loss_mask", "sep_pos", "image_slot_rows"):
        np.testing.assert_array_equal(merged[key][5], expected[key], err_msg=key)
    assert merged["image_slot_rows"][0].tolist() == [0, 0, 0, 0]
    assert not merged["loss_mask"][6:].any()


def test_eval_session_batches_read_the_split_examples(setup):
    data, tokenizer = setup
    (batch,) = pipeline.session_batches(_config(), data, tokenizer, "valid", 2, shuffle=False,
                                        repeat=False, seed=0)
    assert batch["rows"].tolist() == [[2, 3], [6, 0]]
    assert batch["next_rows"].tolist() == [[3, 4], [5, 0]]
    assert batch["target"].tolist() == [4, 5] and batch["valid"].all()


def test_ragged_rows_read_as_the_sessions_they_store_and_give_every_position():
    sessions = [[3, 1, 4], [1], [5, 9, 2, 6]]
    rows = prepared.RaggedRows(np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32), np.array([0, 3, 4, 8], np.int64))
    assert len(rows) == 3 and [row.tolist() for row in rows] == sessions
    assert rows[-1].tolist() == [5, 9, 2, 6] and [row.tolist() for row in rows[1:]] == sessions[1:]
    with pytest.raises(IndexError):
        rows[3]
    # Position j >= 1 of each session: (3) -> 1, (3 1) -> 4, then (5) -> 9, (5 9) -> 2, (5 9 2) -> 6.
    for source in (rows, sessions):
        examples = pipeline.SessionExamples.every_position(source)
        assert examples.targets.tolist() == [1, 4, 9, 2, 6]
        assert examples.lengths.tolist() == [1, 2, 1, 2, 3]
        assert examples.starts.tolist() == [0, 0, 4, 4, 4]
        assert examples.flat_rows.tolist() == [3, 1, 4, 1, 5, 9, 2, 6]
