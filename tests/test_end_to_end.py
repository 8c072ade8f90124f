"""The whole method on the tiny preset: train -> export -> downstream -> report, export determinism, and
resume of a stage killed with SIGKILL."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tiny_run):
    return tiny_run  # conftest.py: the session's finished tiny run with the `pop` and `tpad` rows


def test_pipeline_writes_exports_results_and_curves(finished_run):
    from tpad_jax import export

    config, workdir = finished_run
    embeddings, item_ids, meta = export.load_export(os.path.join(workdir, "export"))
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(item_ids), config.model.embed_dim)
    assert np.all(np.isfinite(embeddings))
    assert meta["checkpoint_step"] == config.stage2.steps and meta["dim"] == config.model.embed_dim
    with open(os.path.join(workdir, "results", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {row["model"] for row in rows} == {"pop", "tpad"}
    assert {row["slice"] for row in rows} <= {"all", "cold", "warm"}
    for name in ("results.md", "training_curves.png", "probe.json"):
        assert os.path.exists(os.path.join(workdir, "results", name)), name
    # The per-example ranks the significance tests pair give back the report's averages.
    from tpad_jax.eval import report

    ranks, cold_mask = report.read_ranks(os.path.join(workdir, "results", "ranks.npz"))
    assert set(ranks) == {"pop", "tpad"}
    for row in rows:
        if row["metric"] == "HR" and row["k"] == "20" and row["slice"] in ("all", "cold"):
            selected = ranks[row["model"]][np.ones_like(cold_mask) if row["slice"] == "all" else cold_mask]
            assert abs(100 * np.mean(selected < 20) - float(row["value"])) < 0.006
    # The checkpoints leave the item tables out (rebuilt from the data and the ViT features on disk:
    # test_vision_cache).
    from tpad_jax.train import checkpointing

    manager = checkpointing.make_manager(os.path.join(workdir, "stage2", "checkpoints"), max_to_keep=1)
    saved = manager.item_metadata(config.stage2.steps)["state"].tree["train"]["model"]
    manager.close()
    assert "tables" not in saved and "towers" in saved
    stage2_metrics = [json.loads(line) for line in open(os.path.join(workdir, "stage2", "metrics.jsonl"))]
    logged = set().union(*stage2_metrics)
    assert {"gen_ce", "align_mi", "align_acc", "know_infonce", "separation", "keep"} <= logged


def test_export_rerun_gives_identical_arrays(finished_run, tmp_path):
    from tpad_jax import export, runner

    config, shared = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(shared, workdir, symlinks=True)  # the session's run is read by other test processes
    before, _, _ = export.load_export(os.path.join(workdir, "export"))
    runner.run(config, workdir, "export")  # restores the finished stages, recomputes every export
    after, _, _ = export.load_export(os.path.join(workdir, "export"))
    np.testing.assert_array_equal(before, after)


def _stage1_command(workdir):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
            os.path.join(ROOT, "configs", "tpad_base.py") + ":tiny", "--workdir", workdir, "--stage=1",
            "--config.stage1.steps=30", "--config.train.checkpoint_every=5", "--config.train.eval_every=100"]


def _final_state(workdir, step):
    path = os.path.join(workdir, "stage1", "checkpoints", str(step), "state")
    state = ocp.PyTreeCheckpointer().restore(path)
    leaves = {}

    def collect(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                collect(f"{prefix}/{key}", value)
        else:
            leaves[prefix] = np.asarray(node)

    collect("", state)
    return leaves


def test_stage1_killed_and_restarted_ends_like_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
    subprocess.run(_stage1_command(reference), env=env, check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(_stage1_command(resumed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = os.path.join(resumed, "stage1", "checkpoints", "5")
    try:
        deadline = time.time() + 300
        while not os.path.exists(checkpoint) and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not os.path.exists(os.path.join(resumed, "stage1", "checkpoints", "30"))
    subprocess.run(_stage1_command(resumed), env=env, check=True, capture_output=True, timeout=300)

    expected, actual = _final_state(reference, 30), _final_state(resumed, 30)
    assert expected.keys() == actual.keys()
    max_diff = max(float(np.max(np.abs(expected[k].astype(np.float64) - actual[k].astype(np.float64))))
                   for k in expected if expected[k].dtype.kind == "f")
    print(f"max abs parameter difference, resumed vs uninterrupted: {max_diff:.3g}")
    assert max_diff == 0.0
