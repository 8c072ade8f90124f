"""Whole-pipeline seeds with more downstream seeds each: the rows retrained on a finished seed's exports,
the towers left alone, and the nested table read back against the runs' own test ranks."""

import os
import shutil

import numpy as np
import pytest

from tpad_jax import cli, layout, runner, seeds
from tpad_jax.data import readonly
from tpad_jax.downstream import selection as selection_lib
from tpad_jax.downstream import training
from tpad_jax.eval import report


def test_extra_downstream_seeds_and_the_rows_they_retrain(tiny_run):
    config, _ = tiny_run
    assert seeds.extra_downstream_seeds(3, 2) == [1003, 2003]
    assert seeds.extra_downstream_seeds(3, 0) == []
    config = config.copy_and_resolve_references()
    config.eval.models = ("pop", "tpad,transformer", "sknn", "minilm-knn")
    assert seeds.neural_rows(config) == ["tpad", "transformer"]


def test_a_row_that_trains_nothing_is_refused_before_any_tower_trains(tiny_run, tmp_path):
    config, _ = tiny_run
    with pytest.raises(cli.UserError, match="pop: not a neural row"):
        runner.run_seeds(config, str(tmp_path / "seeds"), [0], downstream_seeds=1, downstream_models=["pop"])
    # A neural row the pipeline does not rank (tiny_run's eval.models: pop, tpad) has no run to pair with.
    with pytest.raises(cli.UserError, match=r"transformer: not a neural row of eval.models; .*\(tpad\)"):
        runner.run_seeds(config, str(tmp_path / "seeds"), [0], downstream_seeds=1,
                         downstream_models=["transformer"])
    assert not os.path.exists(tmp_path / "seeds")


def test_downstream_seeds_of_a_finished_pipeline_seed(tiny_run, tmp_path):
    config, finished = tiny_run
    workdir = str(tmp_path / "pipeline")
    seed_dir = layout.pipeline_seed_dir(workdir, config.seed)
    shutil.copytree(finished, seed_dir)  # the shared run is read only: work on a copy
    stage_files = {name: os.path.getmtime(os.path.join(seed_dir, name, "inputs.json"))
                   for name in os.listdir(seed_dir) if layout.is_stage_name(name)}
    assert stage_files

    text = runner.run_seeds(config, workdir, [config.seed], downstream_seeds=1, downstream_models=["tpad"])

    # The towers were restored, not retrained; the row trained again under seed + 1000 beside them.
    assert {name: os.path.getmtime(os.path.join(seed_dir, name, "inputs.json")) for name in stage_files} == stage_files
    assert not os.path.exists(os.path.join(seed_dir, "stale"))
    other = layout.downstream_seed_dir(seed_dir, config.seed + 1000)
    assert selection_lib.read_selection(layout.row_dir(other, "tpad"))["finished"]
    # The nested cell is the mean of the pipeline run's test HR@20 and the other downstream seed's.
    own, _ = report.read_ranks(os.path.join(layout.results_dir(seed_dir), report.RANKS_FILE))
    seeded = config.copy_and_resolve_references()
    seeded.seed = config.seed + 1000
    again = training.evaluate_neural("tpad", seeded, other, readonly.load(config, seed_dir))  # restored
    assert not np.array_equal(again, own["tpad"])  # another downstream init ranks otherwise
    expected = 100.0 * (np.mean(own["tpad"] < 20) + np.mean(again < 20)) / 2
    assert f"| tpad | {expected:.2f} +- 0.00 (w " in text
    assert "Pipeline seeds 0, each with 2 downstream seeds" in text
    with open(os.path.join(layout.results_dir(workdir), "pipeline_downstream_seeds.md"), encoding="utf-8") as f:
        assert f"| tpad | {expected:.2f} +- 0.00 (w " in f.read()
    assert os.path.exists(os.path.join(layout.results_dir(workdir), "pipeline_downstream_seeds.csv"))
