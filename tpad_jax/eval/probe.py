"""Attribute probes of item embeddings: what an export keeps of the synthetic items' latent attributes.

Two measures per (export, attribute), both plain numpy and deterministic:

- `linear_probe_accuracy`: held-out accuracy of a linear classifier. Ridge-regularised least squares on
  one-hot targets (closed form, no iterative solver), features standardised with the training items'
  mean and standard deviation, k-fold cross-validation over a seeded permutation of the items: every item
  is scored exactly once, by the classifier fitted on the other folds. Chance level
  (`chance_accuracy`): the majority label's share, what the best label-blind predictor scores (for a
  uniform label it is 1 / number of labels: 1/8 for colour, 1/12 for category).
- `knn_purity`: the mean share of each item's k nearest neighbours by cosine similarity (the item itself
  excluded) that carry its label. Ties in similarity go to the lower row index. Chance level
  (`chance_purity`): sum_c n_c (n_c - 1) / (n (n - 1)), the probability that a uniformly drawn other item
  shares the label (about 1 / number of labels when labels are balanced).

`attribute_rows` builds one row per export from in-memory exports and attributes; `write_table`
writes it as DIR/results/attribute_probe.{md,csv}. `synthetic_attributes` reads the latent attributes
of a synthetic catalogue (`tpad_jax/data/synthetic.py`) from its raw directory. `launch/probe.py` is
the command.
"""

import csv
import json
import os

import numpy as np

from tpad_jax.workdir import atomic_open

ATTRIBUTES = ("colour", "category", "shape", "material", "style")
# Export variants in report order, after the towers' frozen ViT input (`launch/probe.py
# --input_features`); other exports (e.g. minilm) follow alphabetically.
EXPORT_ORDER = ("frozen-vit", "raw", "stage1", "tpad", "no-gen", "no-disentangle", "no-align")


# ------------------------------------------------------------------------------------- linear probe
def _codes(labels):
    """Labels of any hashable kind -> (int codes [n] in 0..K-1, K)."""
    values, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.reshape(-1), len(values)


def ridge_fit(features, targets, l2):
    """Ridge regression with an unpenalised intercept.

    Minimises ||x W + b - y||^2 + l2 ||W||^2 by the closed form on centred data:
    W = (xc^T xc + l2 I)^-1 xc^T yc, b = mean(y) - mean(x) W.

    Args:
      features: float [n, d].
      targets: float [n, m].
      l2: ridge strength (>= 0; 0 needs xc^T xc invertible).
    Returns:
      (W float64 [d, m], b float64 [m]).
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc + l2 * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, xc.T @ yc)
    return weights, y_mean - x_mean @ weights


def _standardise(train, test):
    """Both sets scaled by the training set's mean and standard deviation (constant columns: std 1)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def fold_ids(num_items, folds, seed):
    """Fold of each item (int [n]): a seeded permutation dealt round-robin, fold sizes differ by <= 1."""
    if folds < 2 or folds > num_items:
        raise ValueError(f"folds must be in [2, {num_items}], got {folds}")
    ids = np.empty(num_items, np.int64)
    ids[np.random.default_rng(seed).permutation(num_items)] = np.arange(num_items) % folds
    return ids


def linear_probe_predictions(features, labels, *, folds=5, l2=1.0, seed=0):
    """Held-out predicted label code of every item (int [n]) and the label codes (int [n]).

    Each fold is predicted by a ridge classifier (one-hot targets over all labels, argmax of the
    scores) fitted on the other folds' standardised features.
    """
    x = np.asarray(features, np.float64)
    codes, num_labels = _codes(labels)
    if x.ndim != 2 or len(x) != len(codes):
        raise ValueError(f"features must be [n, d] with n = {len(codes)} labels, got {x.shape}")
    onehot = np.eye(num_labels)[codes]
    assignment = fold_ids(len(codes), folds, seed)
    predicted = np.empty(len(codes), np.int64)
    for fold in range(folds):
        held_out = assignment == fold
        train, test = _standardise(x[~held_out], x[held_out])
        weights, bias = ridge_fit(train, onehot[~held_out], l2)
        predicted[held_out] = np.argmax(test @ weights + bias, axis=1)
    return predicted, codes


def linear_probe_accuracy(features, labels, *, folds=5, l2=1.0, seed=0):
    """Held-out accuracy in [0, 1] of a linear (ridge, one-hot) classifier from features to labels.

    Args:
      features: float [n, d], one row per item.
      labels: [n] labels (ints or strings).
      folds: k of the k-fold cross-validation (every item is held out exactly once).
      l2: ridge strength on the standardised features.
      seed: seed of the item permutation that deals the folds.
    """
    predicted, codes = linear_probe_predictions(features, labels, folds=folds, l2=l2, seed=seed)
    return float(np.mean(predicted == codes))


def chance_accuracy(labels):
    """The majority label's share: the accuracy of the best predictor that ignores the features."""
    codes, _ = _codes(labels)
    return float(np.bincount(codes).max() / len(codes))


# ------------------------------------------------------------------------------------- k-NN purity
def nearest_neighbours(features, k=10, chunk=1024):
    """The k nearest other items of every item by cosine similarity: int [n, k], nearest first.

    The item itself is excluded; equal similarities go to the lower row index. A zero vector has
    similarity 0 to every item.
    """
    x = np.asarray(features, np.float64)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} items, got {k}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    neighbours = np.empty((n, k), np.int64)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        similarity = unit[rows] @ unit.T
        similarity[np.arange(len(rows)), rows] = -np.inf
        neighbours[rows] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return neighbours


def neighbour_purity(neighbours, labels):
    """Mean over items of the share of its neighbours (int [n, k] rows) that carry its label."""
    codes, _ = _codes(labels)
    return float(np.mean(codes[neighbours] == codes[:, None]))


def knn_purity(features, labels, k=10):
    """Mean over items of the share of its k cosine nearest neighbours (itself excluded) with its label."""
    return neighbour_purity(nearest_neighbours(features, k), labels)


def chance_purity(labels):
    """Expected purity of random neighbours: P(a uniformly drawn other item shares the label)."""
    codes, _ = _codes(labels)
    counts = np.bincount(codes).astype(np.float64)
    n = len(codes)
    return float(np.sum(counts * (counts - 1)) / (n * (n - 1)))


# ------------------------------------------------------------------------------ synthetic attributes
def is_synthetic_catalogue(raw_dir):
    """Whether `raw_dir` holds a catalogue written by `synthetic.generate` (attributes known)."""
    return all(os.path.exists(os.path.join(raw_dir, name)) for name in ("oracle.npz", "generator.json"))


def synthetic_attributes(raw_dir):
    """The latent attributes of a synthetic catalogue's items.

    Category, colour, material and style are stored in oracle.npz (generator index -> attribute code,
    with the generator's item ids). The shape is not stored: `synthetic.generate` draws it as
    `default_rng([seed, 1]).integers(0, len(SHAPES), num_items)` (its first draw from that generator),
    so it is drawn again here from generator.json's seed; `tests/test_probe.py` checks it against the
    rendered images.

    Returns:
      (item_ids: list of str, {attribute: int [N]}) in generator order.
    """
    from tpad_jax.data import synthetic  # noqa: PLC0415  (only for the attribute vocabularies)

    with open(os.path.join(raw_dir, "generator.json"), encoding="utf-8") as f:
        settings = json.load(f)
    with np.load(os.path.join(raw_dir, "oracle.npz"), allow_pickle=False) as arrays:
        item_ids = arrays["item_ids"].tolist()
        attributes = {name: arrays[name].astype(np.int64) for name in ("colour", "category", "material",
                                                                     "style")}
    rng = np.random.default_rng([settings["seed"], 1])
    attributes["shape"] = rng.integers(0, len(synthetic.SHAPES), len(item_ids)).astype(np.int64)
    return item_ids, {name: attributes[name] for name in ATTRIBUTES}


# ------------------------------------------------------------------------------------------ the table
def export_sort_key(name):
    return (EXPORT_ORDER.index(name), "") if name in EXPORT_ORDER else (len(EXPORT_ORDER), name)


def _aligned_labels(item_ids, attribute_ids, attributes):
    index = {item_id: i for i, item_id in enumerate(attribute_ids)}
    missing = [item_id for item_id in item_ids if item_id not in index]
    if missing:
        raise ValueError(f"{len(missing)} exported items have no attributes (e.g. {missing[0]!r})")
    rows = np.array([index[item_id] for item_id in item_ids], np.int64)
    return {name: values[rows] for name, values in attributes.items()}


def attribute_rows(exports, attribute_ids, attributes, *, k=10, folds=5, l2=1.0, seed=0):
    """One row per export plus the chance row.

    Args:
      exports: {name: (embeddings float [n, d], item_ids list of n str)}; all over the same item set.
      attribute_ids: item ids of the attribute arrays.
      attributes: {attribute: labels [len(attribute_ids)]}.
    Returns:
      list of dicts: export, items, dim, probe:<attribute> (accuracy), knn<k>:<attribute> (purity), all
      in [0, 1]; the chance row last (export "chance", dim 0).
    """
    if not exports:
        raise ValueError("no exports")
    item_sets = {name: frozenset(ids) for name, (_, ids) in exports.items()}
    first = next(iter(item_sets.values()))
    if any(items != first for items in item_sets.values()):
        raise ValueError("the exports cover different item sets; probe them separately")
    rows = []
    for name in sorted(exports, key=export_sort_key):
        embeddings, item_ids = exports[name]
        labels = _aligned_labels(item_ids, attribute_ids, attributes)
        row = {"export": name, "items": len(item_ids), "dim": int(np.shape(embeddings)[1])}
        for attribute, values in labels.items():
            row[f"probe:{attribute}"] = linear_probe_accuracy(embeddings, values, folds=folds, l2=l2,
                                                              seed=seed)
        neighbours = nearest_neighbours(embeddings, k)  # once per export, for every attribute
        for attribute, values in labels.items():
            row[f"knn{k}:{attribute}"] = neighbour_purity(neighbours, values)
        rows.append(row)
    labels = _aligned_labels(sorted(first), attribute_ids, attributes)
    chance = {"export": "chance", "items": len(first), "dim": 0}
    chance.update({f"probe:{a}": chance_accuracy(v) for a, v in labels.items()})
    chance.update({f"knn{k}:{a}": chance_purity(v) for a, v in labels.items()})
    rows.append(chance)
    return rows


def _columns(rows):
    return [key for key in rows[0] if ":" in key]


def markdown(rows, *, k=10, folds=5, l2=1.0, seed=0):
    """The table as markdown: probe accuracy in %, k-NN purity as a share in [0, 1]."""
    columns = _columns(rows)
    probes = [c for c in columns if c.startswith("probe:")]
    purities = [c for c in columns if not c.startswith("probe:")]
    header = ([f"{c.split(':')[1]} acc %" for c in probes] + [f"{c.split(':')[1]} {k}-NN" for c in purities])
    lines = [
        f"Attribute probe of the exports ({rows[0]['items']} items). Linear probe: held-out accuracy (%) "
        f"of a ridge classifier (l2 = {l2:g}) on the standardised exported embeddings, {folds}-fold "
        f"cross-validation (seed {seed}). {k}-NN purity: mean share of an item's {k} cosine nearest "
        "neighbours with its label. Chance: the majority label's share (accuracy) and the probability "
        "that a random other item shares the label (purity). Colour and shape show only in the image, "
        "category only in the title, material and style in both.",
        "",
        "| export | dim | " + " | ".join(header) + " |",
        "|---|---:|" + "---:|" * len(header),
    ]
    for row in rows:
        cells = [f"{100 * row[c]:.1f}" for c in probes] + [f"{row[c]:.2f}" for c in purities]
        dim = row["dim"] if row["export"] != "chance" else ""
        lines.append(f"| {row['export']} | {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows, results_dir, *, k=10, folds=5, l2=1.0, seed=0):
    """Writes results_dir/attribute_probe.md and attribute_probe.csv (values in [0, 1]); returns the md."""
    os.makedirs(results_dir, exist_ok=True)
    text = markdown(rows, k=k, folds=folds, l2=l2, seed=seed)
    with atomic_open(os.path.join(results_dir, "attribute_probe.md"), encoding="utf-8") as f:
        f.write(text)
    columns = _columns(rows)
    with atomic_open(os.path.join(results_dir, "attribute_probe.csv"), newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["export", "items", "dim", *[c.replace(":", "_") for c in columns]])
        for row in rows:
            writer.writerow([row["export"], row["items"], row["dim"], *[f"{row[c]:.4f}" for c in columns]])
    return text
