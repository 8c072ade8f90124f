"""The recommender (tpad_jax/recommender.py) and its CLI: one compile, JSON lines per session, unknown-id
and bad-line reporting, exclusion of seen items, scores of the selected model."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tpad_base
from tpad_jax import cli, layout
from tpad_jax import recommender as recommender_lib
from tpad_jax.data import prepared
from tpad_jax.downstream import scoring, serving, tables, training
from tpad_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workdir with one `gru4rec` trained for an epoch (shapes as the plain tiny preset)."""
    config = tpad_base.get_config("tiny")
    config.msbr.max_epochs = 1
    workdir = str(tmp_path_factory.mktemp("recommend"))
    data = prepared.load_or_prepare(config, workdir)
    training.train_msbr("gru4rec", config, workdir, data)
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
        (tmp_path / "msbr" / name / layout.SELECTION_FILE).write_text(
            json.dumps({"best_metric": 30.0, "finished": finished}))
    serving.check_trained(str(tmp_path), "transformer")
    with pytest.raises(cli.UserError, match=r"srgnn/selection.json: the training of 'srgnn' was interrupted"):
        serving.check_trained(str(tmp_path), "srgnn")
    with pytest.raises(cli.UserError, match=r"msbr/gru4rec: model 'gru4rec' is not trained in this workdir"):
        serving.check_trained(str(tmp_path), "gru4rec")
    with pytest.raises(cli.UserError, match="unknown neural model 'tpadd'"):
        serving.check_trained(str(tmp_path), "tpadd")


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
    assert result.stderr == ""  # no log lines of JAX's backend probing or of the checkpoint readers
    a, b, c = records
    assert a["model"] == "gru4rec" and a["unknown_items"] == ["no-such-item"] and "error" not in a
    assert b["unknown_items"] == ["x1", "x2"] and b["recommendations"] == [] and "error" in b
    assert c["unknown_items"] == [] and len(c["recommendations"]) == 5

    # The recommendations are the top 5 of the selected model's scores for the known clicks, the
    # session's own items left out.
    model = serving.load_selected("gru4rec", config, workdir, data)
    score_fn = scoring.prefix_scorer(model, tables.prefix_width(config), batch_size=1)
    scores = np.asarray(score_fn([np.array([3, 7], np.int32)]))[0]
    top = [row for row in np.argsort(-scores, kind="stable") if row not in (3, 7)][:5]
    assert [r["item_id"] for r in a["recommendations"]] == [ids[row] for row in top]
    assert [r["title"] for r in a["recommendations"]] == [data.titles[row] for row in top]
    np.testing.assert_allclose([r["score"] for r in a["recommendations"]], scores[top], rtol=1e-5, atol=1e-6)
    probabilities = np.exp(scores - np.log(np.sum(np.exp(scores.astype(np.float64)))))
    np.testing.assert_allclose([r["probability"] for r in a["recommendations"]], probabilities[top], rtol=1e-4)


def test_one_compile_serves_every_number_and_length_of_sessions(tiny_run):
    config, workdir = tiny_run
    jax.clear_caches()  # an earlier test may have compiled the same shapes; count from nothing
    with loop.CompileCounter() as compiles:
        recommender = recommender_lib.Recommender.from_workdir(workdir, batch_size=8)  # config.json
        assert compiles.of(recommender_lib.recommend_scores) == 1
        ids = recommender.item_ids
        for count in (1, 3, 8, 21):  # 21 sessions: three calls of 8
            sessions = [ids[i:i + 1 + (5 * i) % 30] for i in range(count)]  # 1 to 30 clicks (width 19)
            results = recommender.recommend(sessions, k=4)
            assert [len(r["recommendations"]) for r in results] == [4] * count
        assert compiles.of(recommender_lib.recommend_scores) == 1
    assert recommender.config.to_dict() == config.to_dict()  # DIR/config.json read back as it was


def test_exclude_seen_and_k(tiny_run):
    _, workdir = tiny_run
    recommender = recommender_lib.Recommender.from_workdir(workdir, batch_size=2)
    n, ids = recommender.num_items, recommender.item_ids
    session = {"session_id": "s", "items": [ids[1], ids[1], ids[2], "no-such-item"]}
    everything = recommender.recommend([session], k=n, exclude_seen=False)[0]
    assert everything["session_id"] == "s" and everything["unknown_items"] == ["no-such-item"]
    ranked = [r["item_id"] for r in everything["recommendations"]]
    assert sorted(ranked) == sorted(ids)
    assert sum(r["probability"] for r in everything["recommendations"]) == pytest.approx(1.0, abs=1e-4)
    unseen = [r["item_id"] for r in recommender.recommend([session], k=n)[0]["recommendations"]]
    assert unseen == [item for item in ranked if item not in (ids[1], ids[2])]  # n - 2 items are left
    for k in (0, n + 1, -1, 2.0, True):
        with pytest.raises(cli.UserError, match=f"top_k must be an integer from 1 to {n}"):
            recommender.recommend([session], k=k)
    with pytest.raises(cli.UserError, match=r"sessions\[1\]: field 'items': expected item id strings, got int"):
        recommender.recommend([[ids[0]], {"items": [3]}])


def test_cli_answers_good_lines_and_reports_bad_ones(tiny_run, tmp_path):
    _, workdir = tiny_run
    with open(os.path.join(workdir, "data", "prepared", "catalogue.json"), encoding="utf-8") as f:
        ids = json.load(f)["item_ids"]
    lines = [json.dumps({"session_id": "a", "items": [ids[0], ids[1]]}),
             '{"session_id": "b", "items": [',
             json.dumps({"session_id": "c"}),
             "",
             json.dumps({"session_id": "d", "items": "not a list"}),
             json.dumps(["a list"]),
             json.dumps({"items": [ids[2]]}),
             json.dumps({"session_id": "e", "items": [ids[2]]})]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "recommend.py"), f"--workdir={workdir}", "--sessions=-",
         "--top_k=3"], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True,
        cwd=str(tmp_path))
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("session_id", r.get("line")) for r in records] == ["a", 2, 3, 5, 6, 7, "e"]
    assert records[1]["error"].startswith("malformed JSON")
    assert records[2]["error"] == "field 'items': missing"
    assert records[3]["error"] == "field 'items': expected a list of item id strings, got str"
    assert records[4]["error"] == "expected a JSON object"
    assert records[5]["error"] == "field 'session_id': missing"
    for record in (records[0], records[-1]):
        assert record["model"] == "tpad" and len(record["recommendations"]) == 3
    assert ids[0] not in [r["item_id"] for r in records[0]["recommendations"]]  # --exclude_seen by default

    with pytest.raises(cli.UserError, match="top_k must be an integer from 1 to"):
        next(load_recommend_launcher().recommend(None, workdir, str(tmp_path / "unread.jsonl"), -1))
