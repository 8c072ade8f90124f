"""Attribute probes (tpad_jax/eval/probe.py, launch/probe.py) against hand-computed and closed-form
references: k-NN purity on six hand-placed points, the ridge solution, separable and label-free data,
the synthetic attributes against the catalogue's own titles and images, and the table end to end."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tpad_base
from tpad_jax import cli, export
from tpad_jax.data import prepared, synthetic
from tpad_jax.eval import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hand_points():
    """Six 2-D points at angles 0, 10, 25, 90, 100, 120 degrees, labels 0 0 1 1 1 0.

    Radii differ so that Euclidean and cosine neighbours differ: by Euclidean distance b (radius 1) is
    nearest to c (radius 1, 15 degrees away), by cosine to a (radius 10, 10 degrees away).
    """
    degrees = np.array([0.0, 10.0, 25.0, 90.0, 100.0, 120.0])
    radii = np.array([10.0, 1.0, 1.0, 3.0, 0.5, 2.0])
    angles = np.deg2rad(degrees)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return points, np.array([0, 0, 1, 1, 1, 0])


def test_knn_purity_on_hand_placed_points():
    points, labels = hand_points()
    # 2 nearest by angle: a: b(10) c(25); b: a(10) c(15); c: b(15) a(25); d: e(10) f(30); e: d(10) f(20);
    # f: e(20) d(30).
    np.testing.assert_array_equal(probe.nearest_neighbours(points, k=2),
                                  [[1, 2], [0, 2], [1, 0], [4, 5], [3, 5], [4, 3]])
    # Same-label shares: a 1/2, b 1/2, c 0, d 1/2, e 1/2, f 0 -> 2/6.
    assert probe.knn_purity(points, labels, k=2) == pytest.approx(1 / 3)
    # k = 1: a->b yes, b->a yes, c->b no, d->e yes, e->d yes, f->e no -> 4/6.
    assert probe.knn_purity(points, labels, k=1) == pytest.approx(2 / 3)
    assert probe.knn_purity(points, np.array(list("xxyyyx")), k=1) == pytest.approx(2 / 3)  # any labels
    # Chance: 3 + 3 items, P(a random other item shares the label) = (3*2 + 3*2) / (6*5) = 0.4.
    assert probe.chance_purity(labels) == pytest.approx(0.4)
    assert probe.chance_accuracy(labels) == pytest.approx(0.5)
    assert probe.chance_accuracy([0, 1, 1, 2]) == pytest.approx(0.5)


def test_knn_excludes_only_the_item_itself_and_breaks_ties_by_row():
    same = np.ones((4, 3))  # all similarities tie: neighbours are the other rows in row order
    np.testing.assert_array_equal(probe.nearest_neighbours(same, k=2), [[1, 2], [0, 2], [0, 1], [0, 1]])
    assert probe.knn_purity(same, [0, 0, 1, 1], k=1) == pytest.approx(0.5)  # 0->1 yes, 1->0 yes, 2->0, 3->0
    points, _ = hand_points()
    assert (probe.nearest_neighbours(points, k=5, chunk=4) == probe.nearest_neighbours(points, k=5)).all()
    with pytest.raises(ValueError, match="k must be"):
        probe.nearest_neighbours(points, k=6)


def test_ridge_matches_hand_and_augmented_least_squares():
    # x = [0, 1, 2], y = [0, 1, 3], l2 = 1: xc = [-1, 0, 1], yc = [-4/3, -1/3, 5/3];
    # W = sum(xc yc) / (sum(xc^2) + 1) = 3 / 3 = 1, b = mean(y) - mean(x) W = 4/3 - 1 = 1/3.
    weights, bias = probe.ridge_fit(np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [1.0], [3.0]]), 1.0)
    np.testing.assert_allclose(weights, [[1.0]])
    np.testing.assert_allclose(bias, [1 / 3])
    # Against the stacked least-squares form of ridge with an unpenalised intercept column.
    rng = np.random.default_rng(0)
    x, y, l2 = rng.normal(size=(7, 3)), rng.normal(size=(7, 2)), 0.7
    design = np.block([[x, np.ones((7, 1))], [np.sqrt(l2) * np.eye(3), np.zeros((3, 1))]])
    solution = np.linalg.lstsq(design, np.vstack([y, np.zeros((3, 2))]), rcond=None)[0]
    weights, bias = probe.ridge_fit(x, y, l2)
    np.testing.assert_allclose(weights, solution[:3], atol=1e-12)
    np.testing.assert_allclose(bias, solution[3], atol=1e-12)


def test_fold_assignment_holds_every_item_out_once_with_balanced_folds():
    ids = probe.fold_ids(23, 5, seed=1)
    assert sorted(np.bincount(ids).tolist()) == [4, 4, 5, 5, 5]
    assert (ids == probe.fold_ids(23, 5, seed=1)).all() and (ids != probe.fold_ids(23, 5, seed=2)).any()
    with pytest.raises(ValueError, match="folds"):
        probe.fold_ids(3, 5, seed=0)


def test_separable_labels_are_decoded_perfectly():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 200)
    features = 5.0 * np.eye(10)[labels] + 0.1 * rng.normal(size=(200, 10))
    assert probe.linear_probe_accuracy(features, labels) == 1.0
    assert probe.linear_probe_accuracy(features, np.array(["r", "g", "b", "k"])[labels], folds=3) == 1.0
    assert probe.knn_purity(features, labels, k=10) == 1.0


def test_label_free_features_score_chance():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 8, 2000)
    features = rng.normal(size=(2000, 16))
    # Standard errors at chance 1/8: sqrt(p (1 - p) / n) = 0.007 for the 2,000 held-out predictions and
    # about 0.0023 for the 20,000 neighbour pairs; tolerances are about 4 of them.
    chance = probe.chance_accuracy(labels)
    assert probe.linear_probe_accuracy(features, labels) == pytest.approx(chance, abs=0.03)
    assert probe.knn_purity(features, labels) == pytest.approx(probe.chance_purity(labels), abs=0.01)


def test_probe_standardises_and_is_deterministic():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 300)
    features = np.eye(3)[labels] + 0.8 * rng.normal(size=(300, 3))
    features = np.concatenate([features, rng.normal(size=(300, 2))], axis=1)
    accuracy = probe.linear_probe_accuracy(features, labels)
    assert 0.5 < accuracy < 1.0  # partly decodable, so a change of scale could show
    scaled = features * np.array([1e4, 1e-3, 1.0, 1e3, 7.0]) + 50.0
    assert probe.linear_probe_accuracy(scaled, labels) == pytest.approx(accuracy)
    assert probe.linear_probe_accuracy(features, labels) == accuracy


def tiny_synthetic_config():
    config = tpad_base.get_config("tiny")
    config.data.synthetic.num_items = 24
    config.data.synthetic.num_sessions = 60
    config.data.image_size = 16
    return config


def test_synthetic_attributes_match_titles_categories_and_images(tmp_path):
    config = tiny_synthetic_config()
    raw_dir = str(tmp_path / "raw")
    assert not probe.is_synthetic_catalogue(raw_dir)
    prepared.ensure_synthetic(config, raw_dir)
    assert probe.is_synthetic_catalogue(raw_dir)
    item_ids, attributes = probe.synthetic_attributes(raw_dir)
    assert list(attributes) == list(probe.ATTRIBUTES)
    with open(os.path.join(raw_dir, "items.jsonl"), encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    assert item_ids == [item["item_id"] for item in items]
    seed, size = config.data.synthetic.seed, config.data.image_size
    wrong_shape_differs = 0
    for i, item in enumerate(items):
        assert item["category"] == synthetic.CATEGORIES[attributes["category"][i]]
        words = item["title"].lower().split()
        assert words[0] == synthetic.STYLES[attributes["style"][i]]
        assert words[1] == synthetic.MATERIALS[attributes["material"][i]]
        # The image is exactly what colour, shape, material and style render (the shape is re-drawn).
        saved = np.asarray(Image.open(os.path.join(raw_dir, item["image"])).convert("RGB"))
        values = [attributes[name][i] for name in ("colour", "shape", "material", "style")]

        def render(shape, values=values, i=i):
            image = synthetic.render_image(values[0], shape, values[2], values[3], size,
                                           np.random.default_rng([seed, 2, i]))
            return np.asarray(image.convert("RGB"))

        np.testing.assert_array_equal(render(values[1]), saved)
        wrong_shape_differs += not np.array_equal(render((values[1] + 1) % len(synthetic.SHAPES)), saved)
    assert wrong_shape_differs >= len(items) // 2  # the image check does tell shapes apart


def in_memory_exports():
    """Three exports of 120 items: noise; colour one-hot + noise in another row order; noise."""
    rng = np.random.default_rng(4)
    item_ids = [f"syn{i:05d}" for i in range(120)]
    attributes = {name: rng.integers(0, levels, 120) for name, levels in
                  zip(probe.ATTRIBUTES, (8, 12, 6, 6, 4))}
    attributes["colour"] = rng.permutation(np.arange(120) % 8)  # 15 per colour: 10 neighbours fit in one
    colour = 10.0 * np.eye(8)[attributes["colour"]]
    coloured = np.concatenate([colour, 0.1 * rng.normal(size=(120, 8))], axis=1)
    order = rng.permutation(120)
    exports = {"minilm": (rng.normal(size=(120, 6)), item_ids),
               "tpad": (coloured[order], [item_ids[i] for i in order]),
               "raw": (rng.normal(size=(120, 16)), item_ids)}
    return exports, item_ids, attributes


def test_attribute_rows_table_and_files(tmp_path):
    exports, item_ids, attributes = in_memory_exports()
    rows = probe.attribute_rows(exports, item_ids, attributes, k=10, folds=5)
    assert [row["export"] for row in rows] == ["raw", "tpad", "minilm", "chance"]
    raw, tpad, minilm, chance = rows
    assert tpad["probe:colour"] == 1.0 and tpad["knn10:colour"] == 1.0  # alignment by item id
    assert tpad["dim"] == 16 and raw["dim"] == 16 and minilm["dim"] == 6 and tpad["items"] == 120
    for name, values in attributes.items():
        assert chance[f"probe:{name}"] == pytest.approx(probe.chance_accuracy(values))
        assert chance[f"knn10:{name}"] == pytest.approx(probe.chance_purity(values))
        assert raw[f"probe:{name}"] == pytest.approx(
            probe.linear_probe_accuracy(exports["raw"][0], values))
        assert raw[f"knn10:{name}"] == pytest.approx(probe.knn_purity(exports["raw"][0], values, k=10))
    text = probe.write_table(rows, str(tmp_path / "results"))
    assert text == (tmp_path / "results" / "attribute_probe.md").read_text()
    assert "| tpad | 16 | 100.0 |" in text and "| chance |  |" in text
    with open(tmp_path / "results" / "attribute_probe.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["export"] for r in table] == ["raw", "tpad", "minilm", "chance"]
    assert list(table[0])[:4] == ["export", "items", "dim", "probe_colour"] and "knn10_style" in table[0]
    assert float(table[1]["knn10_colour"]) == 1.0
    assert float(table[3]["probe_category"]) == pytest.approx(chance["probe:category"], abs=1e-4)

    with pytest.raises(ValueError, match="different item sets"):
        probe.attribute_rows({**exports, "stage1": (np.zeros((2, 3)), item_ids[:2])}, item_ids, attributes)
    with pytest.raises(ValueError, match="no attributes"):
        probe.attribute_rows({"raw": (np.zeros((2, 3)), ["syn00000", "other"])}, item_ids, attributes)


def load_probe_launcher():
    """launch/probe.py as a module (launch/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("probe_launcher", os.path.join(ROOT, "launch", "probe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_on_a_synthetic_workdir_and_on_other_data(tmp_path, capsys):
    launcher = load_probe_launcher()
    config = tiny_synthetic_config()
    workdir = str(tmp_path / "run")
    with pytest.raises(cli.UserError, match="no synthetic catalogue"):
        launcher.run(config, workdir)
    prepared.ensure_synthetic(config, prepared.raw_dir_for(config, workdir))
    with pytest.raises(cli.UserError, match="no exports"):
        launcher.run(config, workdir)
    item_ids, attributes = probe.synthetic_attributes(prepared.raw_dir_for(config, workdir))
    rng = np.random.default_rng(5)
    rows = rng.permutation(len(item_ids))[:20]  # the protocol may drop items: exports cover a subset
    kept = [item_ids[r] for r in rows]
    colour = np.eye(8)[attributes["colour"][rows]]
    for variant, embeddings in (("tpad", colour + 0.01 * rng.normal(size=colour.shape)),
                                ("stage1", rng.normal(size=(20, 4)))):
        directory = os.path.join(workdir, "export" if variant == "tpad" else f"export_{variant}")
        export.write_export(directory, embeddings, kept, {"variant": variant, "dataset_fingerprint": "f0"})
    export.write_export(os.path.join(workdir, "export_no-align"), np.zeros((20, 4)), kept,
                        {"variant": "no-align", "dataset_fingerprint": "stale"})
    os.makedirs(os.path.join(workdir, "data", "prepared"))
    with open(os.path.join(workdir, "data", "prepared", "fingerprint.txt"), "w") as f:
        f.write("f0\n")
    text = launcher.run(config, workdir, k=3, folds=4)
    assert "skipped" in capsys.readouterr().out  # the export of other prepared data
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| stage1", "| tpad", "| chance"]
    assert lines[2].startswith("| tpad | 8 |") and "3-NN" in lines[0]
    assert os.path.exists(os.path.join(workdir, "results", "attribute_probe.csv"))

    other = tpad_base.get_config("tiny")
    other.data.raw_dir = os.path.join(ROOT, "tests", "fixtures", "text_catalogue")
    assert launcher.run(other, str(tmp_path / "text_run")) is None
    assert "known only for the synthetic catalogue" in capsys.readouterr().out


def test_launcher_probes_the_frozen_vit_input_beside_the_exports(tmp_path):
    launcher = load_probe_launcher()
    config = tpad_base.get_config("tiny")
    workdir = str(tmp_path / "run")
    data = prepared.load_or_prepare(config, workdir)
    # An export that knows nothing, so the table has one tower row beside the ViT input.
    noise = np.random.default_rng(0).normal(size=(data.num_items, 4))
    export.write_export(os.path.join(workdir, "export"), noise, list(data.item_ids),
                        {"variant": "tpad", "dataset_fingerprint": data.fingerprint})
    launcher.run(config, workdir, folds=4, input_features=True)
    with open(os.path.join(workdir, "results", "attribute_probe.csv"), newline="") as f:
        table = {row["export"]: row for row in csv.DictReader(f)}
    assert list(table) == ["frozen-vit", "tpad", "chance"]
    dim = int(table["frozen-vit"]["dim"])
    assert dim > 0 and dim % config.data.item_visual_tokens == 0  # the item's visual tokens side by side
    # Colour shows only in the picture: the random ViT passes it on, far above chance; the noise does not.
    chance = float(table["chance"]["probe_colour"])
    assert float(table["frozen-vit"]["probe_colour"]) > 2 * chance
    assert float(table["tpad"]["probe_colour"]) < 1.5 * chance


def test_attribute_export_is_the_one_hot_attributes_in_prepared_item_order(tmp_path):
    """runner.attribute_features against the catalogue's own records: the category field, the title's
    style and material words, and the colour `synthetic_attributes` reads (checked against the images
    above), item by item in the prepared order, which differs from the generator's."""
    from tpad_jax import runner  # noqa: PLC0415

    config = tpad_base.get_config("tiny")
    config.data.synthetic.num_items = 60
    config.data.synthetic.num_sessions = 300
    config.data.image_size = 16
    config.data.min_item_count = 12
    workdir = str(tmp_path / "run")
    data = prepared.load_or_prepare(config, workdir)
    features = runner.attribute_features(data)
    blocks = np.split(features, np.cumsum([len(synthetic.CATEGORIES), len(synthetic.COLOURS),
                                           len(synthetic.MATERIALS)]), axis=1)
    assert features.shape == (data.num_items, 30) and set(np.unique(features)) == {0.0, 1.0}
    assert all(np.all(block.sum(axis=1) == 1) for block in blocks)
    with open(os.path.join(data.raw_dir, "items.jsonl"), encoding="utf-8") as f:
        records = {item["item_id"]: item for item in map(json.loads, f)}
    generator_ids, attributes = probe.synthetic_attributes(data.raw_dir)
    # The protocol dropped rare items, so prepared rows are not generator rows: a mix-up would fail below.
    assert 0 < data.num_items < len(generator_ids) and list(data.item_ids) != generator_ids[:data.num_items]
    colour_of = dict(zip(generator_ids, attributes["colour"]))
    for row, item_id in enumerate(data.item_ids):
        words = records[item_id]["title"].lower().split()
        assert synthetic.CATEGORIES[blocks[0][row].argmax()] == records[item_id]["category"]
        assert blocks[1][row].argmax() == colour_of[item_id]
        assert synthetic.MATERIALS[blocks[2][row].argmax()] == words[1]
        assert synthetic.STYLES[blocks[3][row].argmax()] == words[0]

    other = tpad_base.get_config("tiny")
    other.data.raw_dir = os.path.join(ROOT, "tests", "fixtures", "text_catalogue")
    text_data = prepared.load_or_prepare(other, str(tmp_path / "text_run"))
    with pytest.raises(cli.UserError, match="not a synthetic catalogue"):
        runner.attribute_features(text_data)


class _Examples:
    """The two things `export.retrieval_ranks` reads of prepared data: a split's prefixes and targets."""

    def __init__(self, prefixes, targets):
        self._split = (prefixes, np.asarray(targets, np.int32))

    def examples(self, split):
        assert split == "test"
        return self._split


def four_items():
    """Four 2-D items at angles 0, 10, 90, 200 degrees with radii 1, 5, 2, 3 (the norms must not matter)."""
    angles, radii = np.deg2rad([0.0, 10.0, 90.0, 200.0]), np.array([1.0, 5.0, 2.0, 3.0])
    return (radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)).astype(np.float32)


def test_retrieval_probe_ranks_by_cosine_to_the_last_click_whatever_the_norms():
    embeddings = four_items()
    prefixes = [np.array([2, 0]), np.array([0]), np.array([3]), np.array([1, 2])]
    # Hand-counted items at a smaller angle from the last click than the target (the last click counts):
    # last 0 -> target 1 (10 deg): item 0; last 0 -> target 2 (90): items 0, 1; last 3 -> target 0 (160):
    # items 3, 2 (110), not 1 (170); last 2 -> target 0 (90): items 2, 1 (80), not 3 (110).
    ranks = export.retrieval_ranks(embeddings, _Examples(prefixes, [1, 2, 0, 0]), "test", batch_size=3)
    np.testing.assert_array_equal(ranks, [1, 2, 2, 2])


def test_probe_file_holds_every_export_given_frozen_encoders_too(tmp_path):
    import types

    from tpad_jax import runner

    class Data(_Examples):
        fingerprint = "f" * 16

        def cold_mask(self, targets):
            return np.ones(len(targets), bool)  # the one test target is cold

    # Two exports over 3 items, one test example (last click 0, target 1). "tpad": item 1 nearest after
    # item 0 (rank 1, in the top 20); "minilm": the target is its farthest item (still rank 2 < 20).
    exports = {"tpad": np.array([[1, 0], [1, 0.1], [-1, 0]], np.float32),
               "minilm": np.array([[1, 0], [-1, 0], [0, 1]], np.float32)}
    data = Data([np.array([0])], [1])
    config = types.SimpleNamespace(eval=types.SimpleNamespace(batch_size=8))
    runner.write_probe(types.SimpleNamespace(data=data, config=config, workdir=str(tmp_path)), exports)
    rows = json.load(open(tmp_path / "results" / "probe.json"))
    assert {row["model"] for row in rows} == {"probe:tpad", "probe:minilm"}
    mrr = {row["model"]: row["value"] for row in rows if row["metric"] == "MRR" and row["slice"] == "cold"}
    assert mrr == pytest.approx({"probe:tpad": 50.0, "probe:minilm": 100.0 / 3})


def test_knn_row_ranks_the_test_split_by_its_exports_cosine(tmp_path):
    from tpad_jax import evaluate, layout

    class Data(_Examples):
        item_ids = ["a", "b", "c", "d"]

    export.write_export(layout.export_dir(str(tmp_path), "minilm"), four_items(), Data.item_ids,
                        {"variant": "minilm"})
    prefixes, targets = [np.array([2, 0]), np.array([3])], np.array([2, 0])
    config = tpad_base.get_config("tiny")
    ranks = evaluate.rank_model("minilm-knn", config, str(tmp_path), Data(prefixes, targets), prefixes, targets)
    np.testing.assert_array_equal(ranks, [2, 2])  # as in the hand count of the probe test above
    with pytest.raises(cli.UserError, match="export_tpad|export/"):
        evaluate.rank_model("tpad-knn", config, str(tmp_path), Data(prefixes, targets), prefixes, targets)
