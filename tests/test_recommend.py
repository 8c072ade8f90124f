"""The recommend CLI: JSON lines per session, unknown-id reporting, scores of the selected model."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax import cli
from tpad_jax.data import prepared
from tpad_jax.train import msbr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workdir with one `gru4rec` trained for an epoch (shapes as the plain tiny preset)."""
    config = tpad_base.get_config("tiny")
    config.msbr.max_epochs = 1
    workdir = str(tmp_path_factory.mktemp("recommend"))
    data = prepared.load_or_prepare(config, workdir)
    msbr.train_msbr("gru4rec", config, workdir, data)
    return config, workdir, data


def load_recommend_launcher():
    """launch/recommend.py as a module (launch/ is a folder of scripts, not a package)."""
    path = os.path.join(ROOT, "launch", "recommend.py")
    spec = importlib.util.spec_from_file_location("recommend_launcher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_finished_models_are_served(tmp_path):
    for name, finished in (("transformer", True), ("srgnn", False)):
        os.makedirs(tmp_path / "msbr" / name)
        (tmp_path / "msbr" / name / msbr.SELECTION_FILE).write_text(
            json.dumps({"best_metric": 30.0, "finished": finished}))
    msbr.check_trained(str(tmp_path), "transformer")
    with pytest.raises(cli.UserError, match=r"srgnn/selection.json: the training of 'srgnn' was interrupted"):
        msbr.check_trained(str(tmp_path), "srgnn")
    with pytest.raises(cli.UserError, match=r"msbr/gru4rec: model 'gru4rec' is not trained in this workdir"):
        msbr.check_trained(str(tmp_path), "gru4rec")
    with pytest.raises(cli.UserError, match="unknown neural model 'tpadd'"):
        msbr.check_trained(str(tmp_path), "tpadd")


def test_the_default_model_is_tpad_never_the_row_that_won_validation(trained, tmp_path):
    config, workdir, _ = trained  # gru4rec is trained and finished; tpad is not
    with pytest.raises(cli.UserError, match="model 'tpad' is not trained"):
        next(load_recommend_launcher().recommend(config, workdir, str(tmp_path / "sessions.jsonl"), 5))


def test_cli_prints_one_json_line_per_session(trained, tmp_path):
    config, workdir, data = trained
    ids = data.item_ids
    long_session = [ids[i % data.num_items] for i in range(25)]  # longer than the encoder's width
    sessions = [{"session_id": "a", "items": [ids[3], "no-such-item", ids[7]]},
                {"session_id": "b", "items": ["x1", "x2"]},
                {"session_id": "c", "items": long_session}]
    path = tmp_path / "sessions.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in sessions))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "recommend.py"), "--config",
         os.path.join(ROOT, "configs", "tpad_base.py") + ":tiny", f"--workdir={workdir}",
         f"--sessions={path}", "--top_k=5", "--model=gru4rec", "--config.msbr.max_epochs=1"],
        capture_output=True, text=True, check=True, cwd=str(tmp_path))
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["session_id"] for r in records] == ["a", "b", "c"]
    a, b, c = records
    assert a["model"] == "gru4rec" and a["unknown_items"] == ["no-such-item"] and "error" not in a
    assert b["unknown_items"] == ["x1", "x2"] and b["recommendations"] == [] and "error" in b
    assert c["unknown_items"] == [] and len(c["recommendations"]) == 5

    # The recommendations are the top 5 of the selected model's scores for the known clicks.
    model = msbr.load_selected("gru4rec", config, workdir, data)
    score_fn = msbr.prefix_scorer(model, msbr.prefix_width(config), batch_size=1)
    scores = np.asarray(score_fn([np.array([3, 7], np.int32)]))[0]
    top = np.argsort(-scores, kind="stable")[:5]
    assert [r["item_id"] for r in a["recommendations"]] == [ids[row] for row in top]
    assert [r["title"] for r in a["recommendations"]] == [data.titles[row] for row in top]
    np.testing.assert_allclose([r["score"] for r in a["recommendations"]], scores[top], rtol=1e-5, atol=1e-6)
