"""Results report: csv round trip and merging, Markdown tables, plots, training curves."""

import json

import pytest

from configs import tpad_base
from tpad_jax import evaluate
from tpad_jax.eval import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows_for(model, base, slices=("all", "cold", "warm")):
    """Rows of one model whose value encodes (slice, metric, k) so tables can be checked by hand."""
    return [{"model": model, "slice": s, "metric": m, "k": k, "value": base + 10 * i + j + k / 100}
            for i, s in enumerate(slices) for j, m in enumerate(("HR", "MRR", "NDCG")) for k in (5, 10, 20)]


def test_csv_round_trip_with_two_decimals(tmp_path):
    rows = [{"model": "pop", "slice": "all", "metric": "HR", "k": 20, "value": 12.3456}]
    report.write_results(rows, str(tmp_path))
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines == ["model,slice,metric,k,value", "pop,all,HR,20,12.35"]
    assert report.read_results(str(tmp_path / "results.csv")) == [dict(rows[0], value=12.35)]


def test_later_runs_merge_by_model(tmp_path):
    report.write_results(rows_for("pop", 1) + rows_for("sknn", 2), str(tmp_path))
    report.write_results(rows_for("tpad", 3), str(tmp_path))
    merged = report.write_results(rows_for("pop", 4), str(tmp_path))
    read = report.read_results(str(tmp_path / "results.csv"))
    assert read == merged
    assert list(dict.fromkeys(r["model"] for r in read)) == ["pop", "sknn", "tpad"]
    assert len(read) == 3 * 27
    pop_all = [r["value"] for r in read if (r["model"], r["slice"], r["metric"]) == ("pop", "all", "HR")]
    assert pop_all == [4.05, 4.10, 4.20]


def test_markdown_bold_best_excludes_oracle_and_marks_missing(tmp_path):
    rows = rows_for("oracle", 90) + rows_for("pop", 1) + rows_for("sknn", 2, slices=("all", "warm"))
    report.write_results(rows, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    parts = text.strip().split("\n\n")
    tables = {title: table.splitlines() for title, table in zip(parts[0::2], parts[1::2])}
    assert list(tables) == ["### all", "### cold", "### warm"]
    header = "| model | " + " | ".join(f"{m}@{k}" for m in ("HR", "MRR", "NDCG") for k in (5, 10, 20)) + " |"
    assert tables["### all"][0] == header
    assert tables["### all"][2].startswith("| oracle | 90.05 |") and "**" not in tables["### all"][2]
    assert tables["### all"][3] == "| pop | 1.05 | 1.10 | 1.20 | 2.05 | 2.10 | 2.20 | 3.05 | 3.10 | 3.20 |"
    assert tables["### all"][4].startswith("| sknn | **2.05** | **2.10** | **2.20** | **3.05** |")
    assert tables["### cold"][3].startswith("| pop | **11.05** |")
    assert tables["### cold"][4] == "| sknn |" + " – |" * 9


def _write_selection(workdir, model, best_epoch, epochs, finished=True, cap=None):
    """A hand-written DIR/msbr/<model>/selection.json (the fields tpad_jax/downstream/selection.py writes)."""
    directory = workdir / "msbr" / model
    directory.mkdir(parents=True)
    history = {str(e): 10.0 + e / 3 for e in range(1, epochs + 1)}
    selection = {"metric": "MRR@20", "split": "valid", "best_epoch": best_epoch,
                 "best_metric": history[str(best_epoch)], "history": history, "finished": finished}
    if cap is not None:
        selection["inputs"] = {"data_fingerprint": "f", "config": {"msbr.max_epochs": cap}, "export": None}
    (directory / "selection.json").write_text(json.dumps(selection))


def test_results_md_lists_each_neural_rows_training_epochs(tmp_path):
    _write_selection(tmp_path, "gru4rec", best_epoch=6, epochs=9, cap=40)
    _write_selection(tmp_path, "tpad", best_epoch=8, epochs=8, cap=8)
    _write_selection(tmp_path, "srgnn", best_epoch=2, epochs=3, finished=False, cap=40)
    _write_selection(tmp_path, "transformer", best_epoch=7, epochs=8)  # from before inputs were recorded
    _write_selection(tmp_path, "sknn-unused", best_epoch=1, epochs=1, cap=40)  # not in the results
    rows = [row for model in ("pop", "gru4rec", "tpad", "srgnn", "transformer", "markov")
            for row in rows_for(model, 1, slices=("all",))]
    report.write_results(rows, str(tmp_path / "results"))
    text = (tmp_path / "results" / "results.md").read_text()
    table = text.split("### training epochs\n\n")[1].strip().splitlines()
    assert table == [
        "| model | best epoch / epochs run | epoch cap | stopped by | valid MRR@20 |",
        "|---|---:|---:|---|---:|",
        "| gru4rec | 6 / 9 | 40 | patience | 12.00 |",
        "| tpad | 8 / 8 | 8 | cap | 12.67 |",
        "| srgnn | 2 / 3 | 40 | interrupted | 10.67 |",
        "| transformer | 7 / 8 | – | – | 12.33 |",
    ]
    assert text.index("### warm") < text.index("### training epochs")


def test_markdown_leaves_all_zero_columns_plain():
    rows = [{"model": m, "slice": "all", "metric": "HR", "k": 5, "value": 0.0} for m in ("pop", "sknn")]
    assert "**" not in report.markdown_tables(rows)


def test_bar_charts_are_pngs(tmp_path):
    report.write_results(rows_for("pop", 1) + rows_for("markov", 2), str(tmp_path))
    for name in ("hr20.png", "mrr20.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_read_results_names_line_and_field(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("model,slice,metric,k,value\npop,all,HR,20,1.00\npop,all,HR,twenty,1.00\n")
    with pytest.raises(ValueError, match=r"results.csv:3: field 'k': not a number: 'twenty'"):
        report.read_results(str(path))
    path.write_text("model,slice,metric,k,value\npop,all,Recall,20,1.00\n")
    with pytest.raises(ValueError, match=r"results.csv:2: field 'metric'"):
        report.read_results(str(path))


def test_metric_records_leave_out_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # torn by a kill: left out
    assert report.read_metric_records(str(path)) == [{"step": 5, "loss": 1.0}]
    path.write_text('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": \n')  # a whole line: an error
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: malformed JSON"):
        report.read_metric_records(str(path))


def test_expand_models():
    config = tpad_base.get_config("tiny")
    assert evaluate.expand_models("baselines", config) == ["oracle", "pop", "s-pop", "markov", "sknn"]
    assert evaluate.expand_models("sknn,baselines,tpad", config) == [
        "sknn", "oracle", "pop", "s-pop", "markov", "tpad"]
    assert evaluate.expand_models("all", config) == list(config.eval.models)
    with pytest.raises(ValueError, match="unknown model.*gpt"):
        evaluate.expand_models("pop,gpt", config)


def test_configured_models_from_a_command_line_list():
    config = tpad_base.get_config("tiny")
    config.eval.models = ("transformer, tpad",)  # what `--config.eval.models=transformer,tpad` gives
    assert evaluate.configured_models(config) == ["transformer", "tpad"]
    assert evaluate.expand_models("all", config) == ["transformer", "tpad"]


def test_evaluate_baselines_on_tiny_preset(tmp_path):
    rows = evaluate.run(tpad_base.get_config("tiny"), str(tmp_path), "baselines")
    assert list(dict.fromkeys(r["model"] for r in rows)) == ["oracle", "pop", "s-pop", "markov", "sknn"]
    assert rows == report.read_results(str(tmp_path / "results" / "results.csv"))
    value = {(r["model"], r["slice"], r["metric"], r["k"]): r["value"] for r in rows}
    for model in ("oracle", "pop", "s-pop", "markov", "sknn"):
        hits = [value[(model, "all", "HR", k)] for k in (1, 5, 10, 20)]
        assert hits == sorted(hits) and 0 <= hits[0] and hits[-1] <= 100
        assert value[(model, "all", "MRR", 1)] == value[(model, "all", "HR", 1)]
    # The generator's true distribution beats popularity, and transitions carry signal beyond popularity.
    assert value[("oracle", "all", "NDCG", 20)] > value[("markov", "all", "NDCG", 20)]
    assert value[("markov", "all", "NDCG", 20)] > value[("pop", "all", "NDCG", 20)]
    assert (tmp_path / "results" / "results.md").read_text().startswith("### all")
