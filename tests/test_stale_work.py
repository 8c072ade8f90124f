"""Guards against stale work (issue 17 §2): every stage, export and downstream row records what made it;
a rerun on other inputs moves that work aside and redoes it (one line says so) or refuses; one run per
workdir; atomic artifacts; resumed logs drop redone steps; read-only commands never prepare data.

The scenarios run on copies of the session's finished tiny run (conftest.py `tiny_run`).
"""

import filecmp
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import pytest

from configs import tpad_base
from tpad_jax import cli, evaluate, export, layout, provenance, runner
from tpad_jax import workdir as workdir_lib
from tpad_jax.data import readonly
from tpad_jax.downstream import selection as selection_lib
from tpad_jax.downstream import serving
from tpad_jax.eval import report
from tpad_jax.train import metrics_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The rows of `tiny_run`; no probe evaluation in the stages a test retrains (it shapes nothing).
RUN = {"eval.models": ("pop", "tpad"), "train.eval_every": 1000}
# A cheaper downstream row (one epoch) under another setting.
CHEAP_ROWS = {"msbr__max_epochs": 1, "msbr__dropout": 0.0}


def tiny_config(**overrides):
    """The tiny preset of `tiny_run` with `overrides` ({"section__key": value})."""
    config = tpad_base.get_config("tiny")
    for key, value in {**RUN, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


@pytest.fixture(scope="module")
def finished(tiny_run):
    return tiny_run[1]


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run to rerun on."""
    target = str(tmp_path / "run")
    shutil.copytree(finished, target, symlinks=True)
    return target


def _json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def _fingerprint(workdir):
    with open(os.path.join(workdir, "data", "prepared", "fingerprint.txt")) as f:
        return f.read().strip()


def _moved_lines(text):
    return [line for line in text.splitlines() if "was made from other inputs" in line]


def test_every_stage_export_and_row_records_data_and_config(finished):
    fingerprint = _fingerprint(finished)
    stage1, stage2 = _json(finished, "stage1", "inputs.json"), _json(finished, "stage2", "inputs.json")
    meta = export.load_meta(os.path.join(finished, "export"))
    selection = selection_lib.read_selection(layout.row_dir(finished, "tpad"))
    for record in (stage1, stage2, meta["inputs"], selection["inputs"]):
        assert record["data_fingerprint"] == fingerprint and len(record["config_hash"]) == 64
    assert "stage1.steps" in stage1["config"] and "stage2.align_weight" not in stage1["config"]
    assert stage2["config"]["stage2.align_weight"] == 1.0 and "msbr.dropout" not in stage2["config"]
    assert provenance.identity(meta["inputs"]) == provenance.identity(stage2)
    assert selection["inputs"]["export"] == provenance.record_id(meta["inputs"])
    row_keys = selection["inputs"]["config"]
    assert "msbr.dropout" in row_keys and "model.embed_dim" not in row_keys
    assert not any(key.startswith(("data.worker_count", "eval.")) for key in stage2["config"])


def test_which_work_a_config_change_reaches():
    base = tiny_config()

    def changed(variant_or_row, **overrides):
        config = tiny_config(**overrides)
        if variant_or_row == "row":
            old, new = (provenance.downstream_record(c, "f", "e") for c in (base, config))
        else:
            old, new = (provenance.stage_record(c, "f", variant_or_row) for c in (base, config))
        return provenance.identity(old) != provenance.identity(new)

    assert [changed(v, stage2__align_weight=0.0) for v in ("stage1", "tpad", "no-gen", "no-align", "row")] \
        == [False, True, True, False, False]  # no-align trains with align_weight 0 anyway; the row's own
    # keys are unchanged: it is retrained because the export it read (its record holds the id) is new.
    assert [changed(v, msbr__dropout=0.3) for v in ("raw", "stage1", "tpad", "row")] == [False] * 3 + [True]
    assert all(changed(v, data__train_fraction=0.5) for v in ("raw", "stage1", "tpad", "row"))
    assert not any(changed(v, data__worker_count=2, model__remat=True) for v in ("stage1", "tpad", "row"))
    # A key added later is part of the record only once it leaves the value that behaves as before it.
    assert not changed("tpad", stage2__align_estimator="infonce", model__base_param_dtype="float32")
    assert changed("tpad", stage2__align_estimator="nwj") and not changed("stage1", stage2__align_estimator="nwj")
    assert "stage2.align_estimator" not in provenance.stage_record(base, "f", "tpad")["config"]
    # The probe's schedule shapes a stage only where the stage ends with its best probed state.
    assert not any(changed(v, train__eval_every=7) for v in ("stage1", "tpad", "row"))

    def kept(variant, **overrides):
        return provenance.identity(provenance.stage_record(tiny_config(**overrides), "f", variant))

    assert kept("stage1", stage1__keep_best=True) != kept("stage1", stage1__keep_best=True, train__eval_every=7)
    assert kept("stage1", stage2__keep_best=True) == kept("stage1", stage2__keep_best=True, train__eval_every=7)
    assert kept("tpad", stage2__keep_best=True) != kept("tpad", stage2__keep_best=True, train__eval_every=7)
    why = provenance.differences(provenance.stage_record(base, "f", "tpad"),
                                 provenance.stage_record(tiny_config(stage2__align_weight=0.0), "g", "tpad"))
    assert why == "data fingerprint f -> g; stage2.align_weight 1.0 -> 0.0"


def test_rerun_on_other_data_retrains_not_restores(finished, run_copy, capsys):
    """Issue 17: `--config.data.synthetic.seed=8` on a finished run restored every stage. Stage 1 here; the
    later stages go through the same `claim` (their records hold the data fingerprint too)."""
    old_checkpoints = sorted(os.listdir(os.path.join(run_copy, "stage1", "checkpoints")))
    runner.run(tiny_config(data__synthetic__seed=8), run_copy, "1")
    line, = _moved_lines(capsys.readouterr().out)
    assert line.startswith(f"stage 1: {run_copy}/stage1 was made from other inputs (data fingerprint ")
    assert line.endswith(f"data.synthetic.seed 0 -> 8); moved to {run_copy}/stale/stage1.1; retraining")
    assert sorted(os.listdir(os.path.join(run_copy, "stale", "stage1.1", "checkpoints"))) == old_checkpoints
    record = _json(run_copy, "stage1", "inputs.json")
    assert record["data_fingerprint"] == _fingerprint(run_copy) != _fingerprint(finished)
    assert record["config"]["data.synthetic.seed"] == 8
    # Trained again from step 0 (the old checkpoints are all in stale/).
    assert sorted(os.listdir(os.path.join(run_copy, "stage1", "checkpoints"))) == old_checkpoints


def test_downstream_change_retrains_only_the_downstream_rows(finished, run_copy, capsys):
    runner.run(tiny_config(**CHEAP_ROWS), run_copy, "msbr")
    line, = _moved_lines(capsys.readouterr().out)
    assert line.startswith(f"downstream tpad: {run_copy}/msbr/tpad was made from other inputs (")
    assert "msbr.dropout 0.1 -> 0.0; msbr.max_epochs 2 -> 1" in line
    for name in ("stage1", "stage2", "export", "export_stage1"):
        assert not filecmp.dircmp(os.path.join(finished, name), os.path.join(run_copy, name)).diff_files
    assert os.listdir(os.path.join(run_copy, "stale")) == ["msbr"]
    selection = selection_lib.read_selection(layout.row_dir(run_copy, "tpad"))
    assert selection["finished"] and selection["inputs"]["config"]["msbr.max_epochs"] == 1
    ranks, _ = report.read_ranks(os.path.join(run_copy, "results", report.RANKS_FILE))
    assert sorted(ranks) == ["pop", "tpad"]


@pytest.mark.parametrize("overrides", [{"data__train_fraction": 0.5}, {"stage2__align_weight": 0.0},
                                       {"data__synthetic__num_items": 100}])
def test_downstream_stage_refuses_exports_of_other_inputs(run_copy, overrides):
    """Issue 17: other train_fraction gave old neural rows beside new baselines; align_weight=0 gave the old
    run under a config.json saying 0; a catalogue of another size crashed. `--stage=msbr` cannot redo the
    exports, so it refuses in one line before any result is written."""
    csv_path = os.path.join(run_copy, "results", "results.csv")
    before = report.read_results(csv_path)
    with pytest.raises(cli.UserError, match="/export: exported from other inputs than these") as error:
        runner.run(tiny_config(**overrides), run_copy, "msbr")
    assert "\n" not in str(error.value) and "launch/train.py (--stage=export)" in str(error.value)
    assert report.read_results(csv_path) == before


def test_work_of_unknown_inputs_is_redone_or_refused(run_copy, capsys):
    """A run finished before inputs were recorded: nothing of it is reused without a word."""
    config = tiny_config()
    fingerprint = _fingerprint(run_copy)
    os.remove(os.path.join(run_copy, "stage1", "inputs.json"))
    record = provenance.stage_record(config, fingerprint, "stage1")
    assert provenance.claim(run_copy, "stage1", record, "stage 1")
    line, = _moved_lines(capsys.readouterr().out)
    assert "(no record of the inputs it was made from (made before inputs were recorded))" in line
    assert os.listdir(os.path.join(run_copy, "stage1")) == ["inputs.json"]

    selection_path = os.path.join(layout.row_dir(run_copy, "tpad"), layout.SELECTION_FILE)
    selection = _json(selection_path)
    del selection["inputs"]
    with open(selection_path, "w") as f:
        json.dump(selection, f)
    data = readonly.load(config, run_copy)
    with pytest.raises(cli.UserError, match="model 'tpad' was trained on other inputs than these settings "
                                            r"\(no record"):
        serving.load_selected("tpad", config, run_copy, data)


def _recommend_launcher():
    """launch/recommend.py as a module (launch/ is a folder of scripts, not a package)."""
    path = os.path.join(ROOT, "launch", "recommend.py")
    spec = importlib.util.spec_from_file_location("recommend_launcher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepared_files(workdir):
    """{name: bytes} of DIR/data/prepared/."""
    directory = layout.prepared_dir(workdir)
    files = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    return files


def test_read_only_commands_never_prepare(run_copy, tmp_path):
    prepared_files = _prepared_files(run_copy)
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text('{"session_id": "a", "items": ["x"]}\n')
    recommend = _recommend_launcher().recommend
    with pytest.raises(cli.UserError, match=r"prepared with other data settings \(data.train_fraction "
                                            r"\(absent\) -> 0.5\)"):
        next(recommend(tiny_config(data__train_fraction=0.5), run_copy, str(sessions), 5))
    with pytest.raises(cli.UserError, match=r"'tpad' was trained on other inputs than these settings "
                                            r"\(msbr.hidden_dim 32 -> 16\)"):
        next(recommend(tiny_config(msbr__hidden_dim=16), run_copy, str(sessions), 5))
    with pytest.raises(cli.UserError, match="prepared with other data settings"):
        evaluate.run(tiny_config(data__synthetic__seed=8), run_copy, "pop,tpad")
    assert _prepared_files(run_copy) == prepared_files
    with pytest.raises(cli.UserError, match="is not trained in this workdir"):
        next(recommend(tiny_config(), str(tmp_path / "empty"), str(sessions), 5))
    assert not (tmp_path / "empty" / "data").exists()


def test_a_second_run_in_the_workdir_is_refused_and_a_killed_one_does_not_block(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tpad_jax import workdir; "
         "lock = workdir.lock(sys.argv[1]); lock.__enter__(); print('locked', flush=True); time.sleep(600)",
         workdir], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cli.UserError, match=rf"^{re.escape(workdir)}: another run is using this "
                                                rf"workdir \(pid {holder.pid}\); wait for it"):
            with workdir_lib.lock(workdir):
                pass
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--config",
             os.path.join(ROOT, "configs", "tpad_base.py") + ":tiny", f"--workdir={workdir}", "--models=pop"],
            capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == cli.USER_ERROR_STATUS and result.stdout == ""
        assert result.stderr.splitlines() == [f"evaluate.py: error: {workdir}: another run is using this "
                                              f"workdir (pid {holder.pid}); wait for it to end or choose "
                                              "another --workdir"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lib.lock(workdir), workdir_lib.lock(workdir):  # free again; nested in one process
        assert open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read() == f"pid {os.getpid()}\n"


def _tensorboard_events(directory):
    """Every event of the TFRecord files in `directory`, in file order (TFRecord framing, no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_a_resumed_log_drops_the_records_of_redone_steps(tmp_path):
    writer = metrics_log.MetricsWriter(tmp_path)
    for step in range(1, 7):
        writer.write(step, {"loss": float(step)})
    writer.close()
    first_lines = (tmp_path / metrics_log.METRICS_FILE).read_text().splitlines(keepends=True)
    with open(tmp_path / metrics_log.METRICS_FILE, "a") as f:
        f.write('{"step": 7, "lo')  # a line cut short by a kill
    resumed = metrics_log.MetricsWriter(tmp_path, resume_step=3)  # the checkpoint of step 3: 4.. are redone
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    assert (tmp_path / metrics_log.METRICS_FILE).read_text().startswith("".join(first_lines[:3]))
    records = metrics_log.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    purges = [e.step for e in _tensorboard_events(tmp_path / metrics_log.TENSORBOARD_DIR)
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert purges[-1] == 4  # TensorBoard hides the first attempt's events from step 4 on


def test_results_csv_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    rows = [{"model": "pop", "slice": "all", "metric": "HR", "k": 20, "value": 12.5}]
    report.write_results(rows, str(tmp_path))
    before = (tmp_path / "results.csv").read_text()

    class FailingWriter:
        def __init__(self, f):
            self.f = f

        def writerow(self, row):
            self.f.write(",".join(map(str, row)) + "\n")

        def writerows(self, rows):
            raise OSError("disk full")

    monkeypatch.setattr(report.csv, "writer", FailingWriter)
    with pytest.raises(OSError, match="disk full"):
        report.write_results([dict(rows[0], model="sknn")], str(tmp_path))
    assert (tmp_path / "results.csv").read_text() == before
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
