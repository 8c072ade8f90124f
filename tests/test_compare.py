"""Merging runs on one split: dedup of equal rows, `<model>-<label>` renames, refusal of other splits."""

import json
import os

import numpy as np
import pytest

from tpad_jax import cli
from tpad_jax.eval import compare, report


def _run(root, name, rows, sessions=(1, 2, 3)):
    workdir = os.path.join(root, name)
    prepared = os.path.join(workdir, "data", "prepared")
    os.makedirs(prepared)
    np.savez(os.path.join(prepared, "splits.npz"), test_session_items=np.array(sessions, np.int32))
    with open(os.path.join(prepared, "catalogue.json"), "w") as f:
        json.dump({"item_ids": ["a", "b", "c"], "data_config": {"raw_dir": name}}, f)
    report.write_results([{"model": m, "slice": "all", "metric": "HR", "k": 20, "value": v} for m, v in rows],
                         os.path.join(workdir, "results"))
    return workdir


def test_equal_rows_are_kept_once_and_different_ones_renamed(tmp_path):
    tiny = _run(tmp_path, "tiny", [("pop", 7.0), ("transformer", 50.0), ("tpad", 55.0)])
    smol = _run(tmp_path, "smol", [("pop", 7.0), ("transformer", 50.0), ("tpad", 53.25),
                                   ("transformer+minilm", 52.0)])
    rows = compare.write_comparison(compare.parse_runs(f"tiny:{tiny},smollm2:{smol}"), str(tmp_path / "out"))
    assert [(r["model"], r["value"]) for r in rows] == [
        ("pop", 7.0), ("transformer", 50.0), ("tpad", 55.0), ("tpad-smollm2", 53.25),
        ("transformer+minilm", 52.0)]
    assert report.read_results(str(tmp_path / "out" / "results.csv")) == rows
    assert "tpad-smollm2" in (tmp_path / "out" / "results.md").read_text()


def test_runs_on_different_splits_are_refused(tmp_path):
    tiny = _run(tmp_path, "tiny", [("pop", 7.0)])
    other = _run(tmp_path, "other", [("pop", 7.0)], sessions=(1, 2, 4))
    with pytest.raises(ValueError, match="other data"):
        compare.merge_runs([("tiny", tiny), ("other", other)])


def test_bad_run_specs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="label:DIR"):
        compare.parse_runs("tiny:/a,nolabel")
    with pytest.raises(ValueError, match="distinct labels"):
        compare.parse_runs("a:/x,a:/y")
    with pytest.raises(cli.UserError, match="no prepared data"):
        compare.split_signature(str(tmp_path))
