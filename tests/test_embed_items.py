"""Items outside the catalogue: e_K from the trained K (new_items.py) and their scores (Recommender)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tpad_jax import export, new_items
from tpad_jax import recommender as recommender_lib
from tpad_jax.cli import UserError
from tpad_jax.data import raw, readonly
from tpad_jax.downstream import features as features_lib
from tpad_jax.downstream import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE_ROWS = 6  # items of the run's catalogue sent through the new-item path


def write_items(directory, records, images=()):
    """`directory`/items.jsonl of `records` (dicts, or raw lines), with the image files `images` copied."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for image in images:
        shutil.copy(image, os.path.join(directory, "images", os.path.basename(image)))
    path = os.path.join(directory, "items.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)
    return path


@pytest.fixture(scope="module")
def embedded(tiny_run, tmp_path_factory):
    """(run, catalogue rows, new ids, out dir): catalogue items and new ones embedded by the run's K."""
    config, workdir = tiny_run
    data = readonly.load(config, workdir)
    rows = list(range(CATALOGUE_ROWS))
    records = [{"item_id": data.item_ids[row], "title": data.titles[row], "category": data.categories[row],
                "image": os.path.relpath(data.image_paths[row], data.raw_dir)} for row in rows]
    # A new id whose title uses the catalogue's words, and one with words the tokenizer never saw.
    records += [{"item_id": "new-twin", "title": data.titles[0], "category": data.categories[0],
                 "image": records[0]["image"]},
                {"item_id": "new-unseen-words", "title": "Zyxquorb flimflam teapot", "category": None}]
    directory = str(tmp_path_factory.mktemp("new_items"))
    path = write_items(directory, records, [data.image_paths[row] for row in rows])
    out_dir = os.path.join(directory, "export")
    new_items.embed_new_items(config, workdir, path, out_dir)
    return (config, workdir), data, rows, out_dir


def test_a_catalogue_item_gets_its_exported_embedding_back(embedded):
    (_, workdir), data, rows, out_dir = embedded
    catalogue, _, _ = export.load_export(os.path.join(workdir, "export"))
    again, item_ids, meta = export.load_export(out_dir)
    assert item_ids[:len(rows)] == [data.item_ids[row] for row in rows]
    delta = np.abs(again[:len(rows)] - catalogue[rows]).max()
    print(f"max |delta e_K| over {len(rows)} catalogue items: {delta:.3g}")
    np.testing.assert_allclose(again[:len(rows)], catalogue[rows], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(again[len(rows)], again[0])  # the twin: same content, same e_K
    assert np.all(np.isfinite(again)) and meta["new_items"] and meta["variant"] == "tpad"
    assert meta["inputs"] == export.load_meta(os.path.join(workdir, "export"))["inputs"]


def test_new_items_are_scored_by_their_content_and_recommended(embedded):
    (_, workdir), data, rows, out_dir = embedded
    recommender = recommender_lib.Recommender.from_workdir(workdir, batch_size=8)
    with pytest.raises(UserError, match="item 'syn.*' is already one of the items"):
        recommender.add_items(out_dir)  # its first rows are catalogue items
    embeddings, item_ids, meta = export.load_export(out_dir)
    kept = []  # the two new items as two exports, added one after the other
    for row in (len(rows), len(rows) + 1):
        kept.append(os.path.join(os.path.dirname(out_dir), item_ids[row]))
        export.write_export(kept[-1], embeddings[row:row + 1], item_ids[row:row + 1],
                            dict(meta, titles=meta["titles"][row:row + 1]))

    assert recommender.add_items(kept[0]) + recommender.add_items(kept[1]) == ["new-twin", "new-unseen-words"]
    n = data.num_items
    assert recommender.num_items == n + 2
    session = [data.item_ids[3], data.item_ids[7]]
    ranked = recommender.recommend([session], k=recommender.num_items, exclude_seen=False)[0]["recommendations"]
    scores = {r["item_id"]: r["score"] for r in ranked}
    assert {"new-twin", "new-unseen-words"} <= scores.keys() and len(ranked) == n + 2
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-4)

    # The twin of catalogue row 0 (same title, category and image) scores as row 0 without its ID part.
    model = nnx.view(recommender._model, deterministic=True)  # noqa: SLF001  (its session vector, ID table)
    items, mask = tables.pad_prefixes([np.array([3, 7], np.int32)], tables.prefix_width(recommender.config))
    session_vector = np.asarray(model(items, mask))[0]
    id_part = float(session_vector @ np.asarray(model.id_embedding.embedding[...])[0])
    assert scores["new-twin"] == pytest.approx(scores[data.item_ids[0]] - id_part, abs=1e-4)

    # A new item can be a click too, and is left out of its own session's recommendations.
    result = recommender.recommend([["new-twin"]], k=5)[0]
    assert result["unknown_items"] == [] and "new-twin" not in [r["item_id"] for r in result["recommendations"]]
    with pytest.raises(raw.RawFormatError, match=r"items.jsonl:1: field 'item_id': 'new-twin' is already one"):
        recommender.add_items(write_items(os.path.join(os.path.dirname(out_dir), "again"),
                                          [{"item_id": "new-twin", "title": "x"}]))

    # The CLI serves them with --new_items.
    sessions = os.path.join(os.path.dirname(out_dir), "sessions.jsonl")
    with open(sessions, "w", encoding="utf-8") as f:
        f.write(json.dumps({"session_id": "s", "items": ["new-unseen-words", data.item_ids[0]]}) + "\n")
    record, = load_recommend_launcher().recommend(None, workdir, sessions, n + 1, new_items=kept[1])
    assert record["unknown_items"] == [] and len(record["recommendations"]) == n - 1


def test_a_content_tower_with_item_bias_serves_a_new_item_at_the_cold_items_mean_bias(embedded, tmp_path):
    """Under msbr.id_embedding=false and msbr.item_bias, an item outside the catalogue scores by its content
    and starts with the mean bias of the catalogue's cold items (< cold_threshold train clicks)."""
    from tpad_jax import runner  # noqa: PLC0415

    (config, workdir), data, rows, out_dir = embedded
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    tower = config.copy_and_resolve_references()
    tower.msbr.id_embedding, tower.msbr.item_bias = False, True
    runner.run(tower, copy, stage="msbr")
    recommender = recommender_lib.Recommender.from_workdir(copy, batch_size=8)
    model = recommender._model  # noqa: SLF001
    assert model.id_embedding is None
    bias = np.asarray(model.item_bias[...])[:, 0]
    cold = data.train_item_counts < data.cold_threshold
    new_bias = bias[cold].mean() if cold.any() else bias.mean()
    embeddings, item_ids, meta = export.load_export(out_dir)
    twin = os.path.join(str(tmp_path), "twin")
    export.write_export(twin, embeddings[len(rows):len(rows) + 1], item_ids[len(rows):len(rows) + 1],
                        dict(meta, titles=meta["titles"][len(rows):len(rows) + 1]))
    assert recommender.add_items(twin) == ["new-twin"]
    session = [data.item_ids[3], data.item_ids[7]]
    ranked = recommender.recommend([session], k=recommender.num_items, exclude_seen=False)[0]["recommendations"]
    scores = {r["item_id"]: r["score"] for r in ranked}
    # The twin has catalogue row 0's content: it scores as row 0 with the new-item bias for row 0's own.
    assert abs(bias[0] - new_bias) > 1e-3  # trained biases differ, so the check below can fail
    assert scores["new-twin"] == pytest.approx(scores[data.item_ids[0]] - bias[0] + new_bias, abs=1e-4)


def load_recommend_launcher():
    """launch/recommend.py as a module (launch/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("recommend_launcher", os.path.join(ROOT, "launch", "recommend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_content_transform_is_fitted_on_the_catalogue_once():
    scales = np.array([5.0, 2.0, 1.0, 0.5])
    features = np.random.default_rng(0).normal(size=(400, 4)) * scales + 3.0
    white = features_lib.content_transform(features, "whiten")(features)
    # Closed form: centred and decorrelated; along principal direction i (ascending variance v_i) the
    # variance is v_i / (v_i + 1e-3 max v), the whole scaled to mean squared norm 1.
    variances = np.linalg.eigvalsh(np.cov(features.T, bias=True))
    damped = variances / (variances + 1e-3 * variances.max())
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.diag(damped / damped.sum()), atol=1e-6)
    unit = features_lib.content_transform(features, "l2")(features)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    # New rows get the catalogue's statistics: they do not move the catalogue's normalised features.
    new = features[:3] + 1.0
    whiten = features_lib.content_transform(features, "whiten")
    np.testing.assert_allclose(whiten(new), whiten(np.concatenate([features, new]))[-3:], atol=1e-6)
    np.testing.assert_allclose(whiten(features), features_lib.normalise_content(features, "whiten"), atol=1e-6)


def test_bad_records_fail_with_file_line_and_field(tiny_run, tmp_path):
    config, workdir = tiny_run
    cases = [
        ('{"item_id": "a", "title": "x"}\n{"item_id": "b"}', r"items.jsonl:2: field 'title': missing"),
        ('{"item_id": "a", "title": "x", "category": 3}', r"items.jsonl:1: field 'category': expected string"),
        ('{"item_id": "a", "title": "x", "image": "../x.png"}', r"items.jsonl:1: field 'image': .* outside"),
        ('{"item_id": "a", "title": "x"}\n{"item_id": "a", "title": "y"}', r"items.jsonl:2: field 'item_id': dup"),
        ('{"item_id": "a", "title": "x"', r"items.jsonl:1: malformed JSON"),
    ]
    for number, (text, message) in enumerate(cases):
        path = write_items(str(tmp_path / str(number)), text.split("\n"))
        with pytest.raises(raw.RawFormatError, match=message):
            new_items.read_items(path)
    with pytest.raises(UserError, match="own directory or exports are never written"):
        new_items.embed_new_items(config, workdir, path, os.path.join(workdir, "export", "more"))
    with pytest.raises(UserError, match="'gru4rec' reads no content features"):
        new_items.content_export("gru4rec")

    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "embed_items.py"), f"--workdir={workdir}",
         f"--items={tmp_path / '0' / 'items.jsonl'}", f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"embed_items.py: error: {tmp_path / '0' / 'items.jsonl'}:2: field 'title': missing"]


def test_the_true_attribute_export_cannot_embed_new_items(tmp_path):
    """A new item has no true attributes: the synthetic catalogue's attribute export says so in one line."""
    with pytest.raises(UserError, match=r"export_attributes: exported from the synthetic catalogue's true "
                                        r"attributes, which an item outside the catalogue does not have"):
        new_items.embedder(None, str(tmp_path), None, "attributes")
