"""ID-only catalogues (null titles, no images): read, prepared, evaluated with the content rows skipped."""

import json
import types

import numpy as np
import pytest

from configs import tpad_base
from tpad_jax import evaluate
from tpad_jax.data import prepared, raw
from tpad_jax.eval import report

NO_CONTENT_LINE = ("skipped tpad, srgnn+tpad: the catalogue has no content (no item has a title or an "
                   "image): the towers are not built")


def write_catalogue(folder, titles):
    """Items i0..i5 with `titles` (cycled), and 60 sessions of 3 items that keep every item frequent."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"item_id": f"i{k}", "title": titles[k % len(titles)], "category": str(k % 2)} for k in range(6)]
    sessions = [{"session_id": f"s{n}", "items": [f"i{(n + j) % 6}" for j in range(3)], "timestamp": n}
                for n in range(60)]
    for name, records in (("items.jsonl", items), ("sessions.jsonl", sessions)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def config_for(folder):
    config = tpad_base.get_config("tiny")
    config.data.raw_dir = str(folder)
    return config


def test_null_title_is_read_but_an_absent_one_is_an_error(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"item_id": "a", "title": null}\n{"item_id": "b"}\n')
    with pytest.raises(raw.RawFormatError, match=r"items.jsonl:2: field 'title': missing$"):
        raw.read_items(str(path))
    assert raw.read_items(str(path), on_error="skip") == [raw.Item("a", None, None, None)]


def test_id_only_catalogue_has_no_content(tmp_path):
    folder = write_catalogue(tmp_path / "cat", [None])
    data = prepared.load_or_prepare(config_for(folder), str(tmp_path / "w"))
    assert not data.has_content and not data.has_title.any()
    assert data.titles == [""] * data.num_items  # what a text path would read, never the word "None"
    assert data.stats["items_with_title"] == 0


def test_catalogue_with_some_titles_has_content(tmp_path):
    data = prepared.load_or_prepare(config_for(write_catalogue(tmp_path / "cat", [None, "Blue mug"])),
                                    str(tmp_path / "w"))
    assert data.has_content and data.has_title.tolist() == [False, True] * 3
    assert data.titles[:2] == ["", "Blue mug"] and data.stats["items_with_title"] == 3


@pytest.mark.parametrize("source, has_content, skipped", [
    ("synthetic", True, {}),
    ("canonical", True, {"oracle": evaluate.NO_ORACLE}),
    ("canonical", False, {"oracle": evaluate.NO_ORACLE,
                          "transformer+raw": prepared.NO_CONTENT + ": the towers are not built",
                          "tpad": prepared.NO_CONTENT + ": the towers are not built"}),
])
def test_runnable_models(source, has_content, skipped):
    names = ["oracle", "pop", "transformer", "transformer+raw", "gru4rec", "tpad"]
    data = types.SimpleNamespace(source=source, has_content=has_content)
    runnable, why = evaluate.runnable_models(names, data)
    assert why == skipped and runnable == [name for name in names if name not in skipped]


def test_evaluate_on_an_id_only_catalogue_skips_the_content_rows_and_says_so(tmp_path, capsys):
    config = config_for(write_catalogue(tmp_path / "cat", [None]))
    rows = evaluate.run(config, str(tmp_path / "w"), "baselines,tpad,srgnn+tpad")
    assert list(dict.fromkeys(r["model"] for r in rows)) == ["pop", "s-pop", "markov", "sknn"]
    printed = capsys.readouterr().out.splitlines()
    assert NO_CONTENT_LINE in printed
    assert f"skipped oracle: {evaluate.NO_ORACLE}" in printed
    results_md = (tmp_path / "w" / "results" / "results.md").read_text()
    assert results_md.endswith("### skipped\n\n"
                               f"- oracle: {evaluate.NO_ORACLE}\n"
                               f"- {NO_CONTENT_LINE.removeprefix('skipped ')}\n")
    assert report.read_skipped(str(tmp_path / "w" / "results"))["tpad"].startswith(prepared.NO_CONTENT)


def rows_for(model, value):
    return [{"model": model, "slice": "all", "metric": "HR", "k": 20, "value": value}]


def test_report_keeps_skipped_rows_until_they_are_evaluated(tmp_path):
    results = str(tmp_path)
    report.write_results(rows_for("pop", 1.0), results, {"tpad": "no content", "oracle": "not synthetic"})
    report.write_results(rows_for("markov", 2.0), results)
    assert "- tpad: no content\n- oracle: not synthetic\n" in (tmp_path / "results.md").read_text()
    report.write_results(rows_for("tpad", 3.0), results, {"oracle": "not synthetic"})
    assert report.read_skipped(results) == {"oracle": "not synthetic"}
    assert (tmp_path / "results.md").read_text().endswith("### skipped\n\n- oracle: not synthetic\n")
    assert np.isclose(report.read_results(str(tmp_path / "results.csv"))[-1]["value"], 3.0)


def test_the_whole_run_on_an_id_only_catalogue_skips_the_towers(tmp_path, capsys):
    from tpad_jax import cli, runner

    config = config_for(write_catalogue(tmp_path / "cat", [None]))
    config.eval.models = ("pop", "tpad")
    workdir = tmp_path / "w"
    runner.run(config, str(workdir), "all")
    printed = capsys.readouterr().out
    assert "towers, stages 1-2 and exports skipped: " + prepared.NO_CONTENT in printed
    assert not (workdir / "stage1").exists() and not (workdir / "export").exists()
    assert report.read_skipped(str(workdir / "results"))["tpad"].startswith(prepared.NO_CONTENT)
    with pytest.raises(cli.UserError, match="--stage=1: the catalogue has no content"):
        runner.run(config, str(workdir), "1")
