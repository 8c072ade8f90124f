"""User errors end in one line naming what is wrong and where; awkward but valid input simply works."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import tpad_base
from tpad_jax import cli
from tpad_jax.data import pipeline, prepared, tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tpad_base.py") + ":tiny"


def write_catalogue(folder, items, sessions=None):
    """items.jsonl and sessions.jsonl in `folder`; by default 60 sessions that keep every item."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [item["item_id"] for item in items]
    sessions = sessions or [{"session_id": f"s{n}", "items": [ids[(n + j) % len(ids)] for j in range(3)],
                             "timestamp": n} for n in range(60)]
    for name, records in (("items.jsonl", items), ("sessions.jsonl", sessions)):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                   encoding="utf-8")
    return folder


def config_for(raw_dir, **data):
    config = tpad_base.get_config("tiny")
    config.data.raw_dir = str(raw_dir)
    config.data.update(data)
    return config


def launch(script, *args, verbose=False):
    """Runs launch/<script> with `args`; returns (exit status, stdout, stderr lines)."""
    env = dict(os.environ, TPAD_VERBOSE="1" if verbose else "0")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    return result.returncode, result.stdout, result.stderr.splitlines()


# ------------------------------------------------------------------------------- data faults
def test_missing_raw_dir(tmp_path):
    with pytest.raises(cli.UserError, match=r"^data.raw_dir=\S+/nowhere: no such directory$"):
        prepared.load_or_prepare(config_for(tmp_path / "nowhere"), str(tmp_path / "work"))


def test_sessions_all_too_short_name_the_protocol_settings(tmp_path):
    items = [{"item_id": f"i{k}", "title": f"Item {k}"} for k in range(6)]
    folder = write_catalogue(tmp_path / "short", items,
                             [{"session_id": f"s{n}", "items": [f"i{n % 6}"]} for n in range(30)])
    with pytest.raises(cli.UserError, match=r"short: no train session left after the mmsbr protocol "
                       r"\(30 sessions read; .* 30 sessions then shorter than data.min_session_length=2\)"):
        prepared.load_or_prepare(config_for(folder), str(tmp_path / "work"))


# Solid images in the modes catalogues come in, and the RGB the item table must hold for each.
IMAGE_MODES = {
    "gray16.png": (Image.fromarray(np.full((5, 7), 128 * 257, np.uint16)), (128, 128, 128)),
    "rgba_clear.png": (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # on white
    "gray_alpha.png": (Image.new("LA", (4, 4), (90, 0)), (255, 255, 255)),
    "palette.png": (Image.new("RGB", (4, 4), (200, 0, 0)).quantize(4), (200, 0, 0)),
    "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 0, 0)), (255, 0, 255)),
    "gray.jpg": (Image.new("L", (8, 8), 77), (77, 77, 77)),
    "bilevel.png": (Image.new("1", (4, 4), 1), (255, 255, 255)),
}
TITLES = ["红色连衣裙，纯棉，夏季款 " * 300, "فستان أحمر من القطن " * 100,
          "Платье 👗 " + "x" * 5000]


def test_image_modes_and_long_non_latin_titles_go_through_the_pipeline(tmp_path):
    folder = tmp_path / "catalogue"
    (folder / "images").mkdir(parents=True)
    items = []
    for k, (name, (image, _)) in enumerate(IMAGE_MODES.items()):
        image.save(folder / "images" / name)
        items.append({"item_id": f"m{k}", "title": TITLES[k % len(TITLES)], "image": f"images/{name}"})
    config = config_for(write_catalogue(folder, items), image_size=4)
    data = prepared.load_or_prepare(config, str(tmp_path / "work"))
    assert data.titles[:len(TITLES)] == TITLES

    tokenizer = tokenizer_lib.tokenizer_for(config, data, str(tmp_path / "work"), None)
    # The pictures as the ViT's pass reads them: streamed from the TFDS item table.
    batch = next(pipeline.item_batches(config, data, tokenizer, config.data.visual_tokens_per_item,
                                       data.num_items, shuffle=False, repeat=False, seed=0))
    pixels, has_image = batch["pixels"], batch["has_image"]
    assert has_image.all()
    for row, (name, (_, rgb)) in enumerate(IMAGE_MODES.items()):
        expected = np.broadcast_to(np.array(rgb, np.float32) / 127.5 - 1.0, pixels[row].shape)
        np.testing.assert_allclose(pixels[row], expected, atol=3 / 127.5, err_msg=name)

    table = pipeline.item_prompt_table(config, data, tokenizer, n_img=config.data.visual_tokens_per_item)
    assert table["tokens"].shape[0] == data.num_items
    assert "红色连衣裙" in tokenizer.decode(table["tokens"][0].tolist())


# ------------------------------------------------------------------------------ the commands
def test_bad_data_file_is_one_line_naming_file_and_line(tmp_path):
    folder = write_catalogue(tmp_path / "catalogue", [{"item_id": "a", "title": "A"}])
    with open(folder / "items.jsonl", "a", encoding="utf-8") as f:
        f.write('{"item_id": "b", "title": \n')
    status, stdout, stderr = launch("prepare_data.py", "--config", CONFIG, f"--workdir={tmp_path / 'work'}",
                                    f"--config.data.raw_dir={folder}")
    assert status == cli.USER_ERROR_STATUS and stdout == ""
    assert stderr == [f"prepare_data.py: error: {folder}/items.jsonl:2: malformed JSON: Expecting value"]


def test_misspelled_config_key_is_one_clean_line_and_verbose_shows_the_traceback(tmp_path):
    args = ("--config", CONFIG, f"--workdir={tmp_path}", "--config.data.raw_dirr=/x")
    status, _, stderr = launch("train.py", *args)
    assert status == cli.USER_ERROR_STATUS
    assert stderr == ["train.py: error: --config.data.raw_dirr: no such config key 'raw_dirr'. "
                      'Did you mean "raw_dir" instead of "raw_dirr"?']
    status, _, stderr = launch("train.py", *args, verbose=True)
    assert status != 0 and "Traceback (most recent call last):" in stderr


def test_a_downstream_setting_outside_its_choices_stops_the_run_before_any_work(tmp_path):
    # Before the start-up check these surfaced in the downstream stage, after the towers had trained.
    for override, message in (
            ("--config.msbr.per_model.gru4rec.lr_decay=linear",
             "gru4rec: msbr.lr_decay must be one of cosine, constant, got 'linear'"),
            ("--config.msbr.transformer_norm=middle",
             "gru4rec: msbr.transformer_norm must be one of ('pre', 'post'), got 'middle'")):  # the first row
        workdir = tmp_path / override.split(".")[-1].split("=")[0]
        status, stdout, stderr = launch("train.py", "--config", CONFIG, f"--workdir={workdir}", override)
        assert status == cli.USER_ERROR_STATUS and stdout == ""
        assert stderr == [f"train.py: error: {message}"]
        assert not (workdir / "data").exists() and not (workdir / "config.json").exists()


def test_recommend_refuses_an_interrupted_model_in_one_line(tmp_path):
    # The selection is checked before anything else is read: this workdir holds nothing but it.
    selection = tmp_path / "msbr" / "tpad" / "selection.json"
    selection.parent.mkdir(parents=True)
    selection.write_text(json.dumps({"best_metric": 30.0, "finished": False}))
    status, stdout, stderr = launch("recommend.py", "--config", CONFIG, f"--workdir={tmp_path}",
                                    f"--sessions={tmp_path / 'sessions.jsonl'}")
    assert status == cli.USER_ERROR_STATUS and stdout == ""
    assert stderr == [f"recommend.py: error: {selection}: the training of 'tpad' was interrupted "
                      "(finished: false); rerun launch/evaluate.py --models=tpad to finish it"]
    assert not (tmp_path / "data").exists()
