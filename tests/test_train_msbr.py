"""Downstream recommender training: prefixes, validation-only model selection, early stop, no retraining."""

import importlib.util
import os
import types

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import tpad_base
from tpad_jax import cli, export, layout, provenance, rows, seeds
from tpad_jax.data import prepared
from tpad_jax.downstream import features as features_lib
from tpad_jax.downstream import scoring, serving, tables, training
from tpad_jax.downstream import selection as selection_lib
from tpad_jax.downstream import settings as settings_lib
from tpad_jax.eval import baselines, metrics
from tpad_jax.models import session_encoders
from tpad_jax.train import checkpointing, loop, metrics_log as logging


class RecordingData:
    """A PreparedData that records which splits training reads (examples() calls and attributes)."""

    def __init__(self, data):
        self._data = data
        self.example_splits = []
        self.attributes = set()

    def examples(self, split):
        self.example_splits.append(split)
        return self._data.examples(split)

    def __getattr__(self, name):
        self.attributes.add(name)
        return getattr(self._data, name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's data with a `transformer` trained on it (recording what training read), in the
    base preset's length buckets (the tiny preset has one batch width)."""
    config = tpad_base.get_config("tiny")
    config.msbr.length_buckets = tpad_base.get_config().msbr.length_buckets
    workdir = str(tmp_path_factory.mktemp("msbr"))
    data = prepared.load_or_prepare(config, workdir)
    recording = RecordingData(data)
    model = training.train_msbr("transformer", config, workdir, recording)
    return config, workdir, data, recording, model


def test_padded_examples_keep_the_last_items_of_every_prefix():
    sessions = [np.array([5, 6, 7], np.int32), np.array([1, 2, 3, 4, 9], np.int32)]
    table = tables.PrefixTable.every_prefix(sessions, width=3)
    expected = [([5], 6), ([5, 6], 7), ([1], 2), ([1, 2], 3), ([1, 2, 3], 4), ([2, 3, 4], 9)]
    assert len(table) == len(expected)
    for index, (prefix, target) in enumerate(expected):
        items, mask, got_target = table[index]
        assert got_target == target
        assert mask.tolist() == [True] * len(prefix) + [False] * (3 - len(prefix))
        assert items.tolist() == prefix + [0] * (3 - len(prefix))
    items, mask = tables.pad_prefixes([np.array([8, 9, 10, 11], np.int32)], width=3)
    assert items.tolist() == [[9, 10, 11]] and mask.all()


def _pairs_of_prefix_table(table):
    return sorted((tuple(table.items[i][table.mask[i]]), int(table.targets[i])) for i in range(len(table)))


def _pairs_of_session_table(table):
    """(prefix as the encoder sees it, target) of every counted position of a SessionTable."""
    pairs = []
    for row in range(len(table)):
        for position in np.flatnonzero(table.target_mask[row]):
            pairs.append((tuple(table.items[row, :position + 1]), int(table.targets[row, position])))
    return sorted(pairs)


def test_session_table_holds_exactly_the_prefix_examples():
    rng = np.random.default_rng(3)
    # Lengths up to 9 with width 4: sessions longer than width + 1 need truncated-prefix rows.
    sessions = [rng.integers(1, 30, size=rng.integers(2, 10)).astype(np.int32) for _ in range(25)]
    width = 4
    session_table = tables.SessionTable.every_session(sessions, width)
    assert _pairs_of_session_table(session_table) == _pairs_of_prefix_table(
        tables.PrefixTable.every_prefix(sessions, width))
    # Padding never counts, and each counted position has its click.
    assert not np.any(session_table.target_mask & ~session_table.mask)


def test_session_table_rows_of_a_long_session():
    table = tables.SessionTable.every_session([np.array([1, 2, 3, 4, 5], np.int32)], width=2)
    assert table.items.tolist() == [[1, 2], [2, 3], [3, 4]]
    assert table.targets.tolist() == [[2, 3], [0, 4], [0, 5]]
    assert table.target_mask.tolist() == [[True, True], [False, True], [False, True]]


def test_bucketed_batches_cover_every_example_once_per_epoch_at_its_bucket_width():
    rng = np.random.default_rng(0)
    sessions = [rng.integers(1, 50, size=rng.integers(2, 12)).astype(np.int32) for _ in range(40)]
    table = tables.PrefixTable.every_prefix(sessions, width=10)
    batches = tables.BucketedBatches(table, (3, 10), batch_size=8, seed=1, num_epochs=2)
    assert len(batches) == 2 * batches.batches_per_epoch
    epochs = []
    for epoch in range(2):
        seen = []
        for position in range(batches.batches_per_epoch):
            batch = batches[epoch * batches.batches_per_epoch + position]
            width = batch["items"].shape[1]
            assert width in (3, 10) and batch["items"].shape[0] == 8
            for items, mask, target, valid in zip(batch["items"], batch["mask"], batch["target"],
                                                  batch["valid"]):
                if not valid:
                    continue
                # Find the example by content: the padded row of a table entry, cut to the batch width.
                matches = [i for i in range(len(table)) if table.targets[i] == target
                           and np.array_equal(table.items[i][:width], items)
                           and table.mask[i].sum() == mask.sum() and not table.mask[i][width:].any()]
                assert matches
                seen.append(tuple(table.items[matches[0]]) + (int(target),))
                assert (mask.sum() <= 3) == (width == 3)
        everything = [tuple(table.items[i]) + (int(table.targets[i]),) for i in range(len(table))]
        assert sorted(seen) == sorted(everything)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = tables.BucketedBatches(table, (3, 10), batch_size=8, seed=1, num_epochs=2)
    halves = [tables.BucketedBatches(table, (3, 10), 8, 1, 2, process_index=p, process_count=2) for p in (0, 1)]
    for index in (0, 5):
        np.testing.assert_array_equal(again[index]["items"], batches[index]["items"])
        np.testing.assert_array_equal(np.concatenate([h[index]["target"] for h in halves]),
                                      batches[index]["target"])


def test_session_batches_list_each_counted_example_once_per_epoch_in_its_own_shard():
    """Over 2 processes x 2 shards, the listed positions of an epoch's batches are exactly the
    (prefix, target) pairs of every prefix (the PrefixTable's), each read inside its own shard's rows;
    every batch of a width has that width's one capacity (the fullest shard's count, rounded up to 8),
    and filler is never valid."""
    rng = np.random.default_rng(4)
    sessions = [rng.integers(1, 40, size=rng.integers(2, 11)).astype(np.int32) for _ in range(50)]
    width, batch_size, shards, processes = 6, 8, 2, 2
    table = tables.SessionTable.every_session(sessions, width)
    sources = [tables.BucketedBatches(table, (3, width), batch_size, 2, 2, p, processes, shards)
               for p in range(processes)]
    assert sources[0].capacity == sources[1].capacity
    assert set(sources[0].capacity) == {3, width} and all(c % 8 == 0 for c in sources[0].capacity.values())
    rows_per_shard = batch_size // processes // shards
    most = {3: 0, width: 0}  # counted examples in one shard, the most over both epochs
    for epoch in range(2):
        seen = []
        for position in range(sources[0].batches_per_epoch):
            for source in sources:
                batch = source[epoch * source.batches_per_epoch + position]
                w = batch["items"].shape[1]
                assert batch["positions"].shape == (shards, source.capacity[w])
                for shard in range(shards):
                    most[w] = max(most[w], int(batch["valid"][shard].sum()))
                    for flat, target, valid in zip(batch["positions"][shard], batch["target"][shard],
                                                   batch["valid"][shard]):
                        if not valid:
                            assert flat == 0
                            continue
                        row, column = shard * rows_per_shard + flat // w, flat % w
                        assert batch["mask"][row, :column + 1].all()
                        seen.append((tuple(batch["items"][row, :column + 1]), int(target)))
        assert sorted(seen) == _pairs_of_prefix_table(tables.PrefixTable.every_prefix(sessions, width))
    # The capacity is the fullest shard's count rounded up to 8, not more.
    assert sources[0].capacity == {w: max(8, -(-most[w] // 8) * 8) for w in most}


def test_the_loss_over_listed_positions_is_the_softmax_cross_entropy_of_the_counted_examples():
    rng = np.random.default_rng(5)
    sessions = [rng.integers(1, 30, size=rng.integers(2, 9)).astype(np.int32) for _ in range(12)]
    width, shards, num_items, dim = 5, 4, 30, 6
    table = tables.SessionTable.every_session(sessions, width)
    rows = np.arange(8)
    valid = np.arange(8) < 7  # the last row is filler
    batch = table.batch(rows, width, valid, shards, capacity=16)
    vectors = rng.normal(size=(8, width, dim)).astype(np.float32)
    items = rng.normal(size=(num_items, dim)).astype(np.float32)
    got = session_encoders.chunked_softmax_cross_entropy(
        tables.counted_vectors(vectors, batch["positions"]), items, batch["target"].reshape(-1), 8192,
        mask=batch["valid"].reshape(-1))
    # Reference: every counted position of the valid rows, read off the table directly.
    losses = []
    for row in rows[valid]:
        for column in np.flatnonzero(table.target_mask[row]):
            logits = items.astype(np.float64) @ vectors[row, column]
            losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                          - logits[table.targets[row, column]])
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


def test_selection_state_keeps_the_earliest_best_and_counts_patience():
    assert selection_lib.selection_state({1: 3.0, 2: 5.0, 3: 5.0}, patience=2) == (
        {"best_epoch": 2, "best_metric": 5.0, "stop": False})
    assert selection_lib.selection_state({1: 3.0, 2: 5.0, 3: 5.0, 4: 4.0}, patience=2)["stop"]
    assert not selection_lib.selection_state({1: 3.0}, patience=1)["stop"]


def test_training_reduces_loss_and_beats_pop(tiny):
    config, workdir, data, _, _ = tiny
    losses = [r["loss"] for r in logging.read_metrics(layout.row_dir(workdir, "transformer")) if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3

    ranks = training.evaluate_neural("transformer", config, workdir, data)
    prefixes, targets = data.examples("test")
    assert ranks.dtype == np.int32 and ranks.shape == targets.shape
    pop = baselines.make_baseline("pop", config).fit(data.train, data.num_items)
    pop_ranks = metrics.rank_targets(pop.score, prefixes, targets, config.eval.batch_size)
    ours, theirs = metrics.metrics_from_ranks(ranks, (20,)), metrics.metrics_from_ranks(pop_ranks, (20,))
    assert ours[("MRR", 20)] > theirs[("MRR", 20)] + 5.0
    assert ours[("HR", 20)] > theirs[("HR", 20)]


def test_model_selection_reads_validation_never_test(tiny):
    config, workdir, data, recording, model = tiny
    assert set(recording.example_splits) == {"valid"}
    assert "test" not in recording.attributes
    selection = selection_lib.read_selection(layout.row_dir(workdir, "transformer"))
    assert selection["split"] == "valid" and selection["metric"] == "MRR@20" and selection["finished"]
    history = {int(e): v for e, v in selection["history"].items()}
    assert sorted(history) == list(range(1, config.msbr.max_epochs + 1))
    assert selection["best_metric"] == max(history.values())
    # The returned parameters are the selected epoch's: they reproduce its validation metric.
    prefixes, targets = data.examples("valid")
    ranks = scoring.rank_split(model, config, prefixes, targets)
    assert metrics.metrics_from_ranks(ranks, (20,))[("MRR", 20)] == pytest.approx(selection["best_metric"],
                                                                                 abs=1e-6)


def test_rank_examples_equals_ranking_the_full_score_matrix(tiny):
    """Length buckets and chunking change only how prefixes are batched: every rank equals the one read
    off the full [n, N] score matrix of prefixes padded to the full width."""
    config, _, data, _, model = tiny
    prefixes, targets = data.examples("valid")
    width = tables.prefix_width(config)
    dense = metrics.rank_targets(scoring.prefix_scorer(model, width, 32), prefixes, targets, 32)
    lengths = np.array([len(prefix) for prefix in prefixes])
    buckets = (1, 2)
    assert len(set(np.searchsorted(tables.bucket_widths(buckets, width), np.minimum(lengths, width)))) == 3
    for batch_size, chunk_buckets in [(32, ()), (32, buckets), (5, buckets)]:
        ranks = scoring.rank_examples(model, prefixes, targets, width, batch_size, chunk_buckets)
        np.testing.assert_array_equal(ranks, dense)


def test_rerun_on_a_finished_workdir_does_not_train(tiny, monkeypatch):
    config, workdir, data, _, model = tiny
    metrics_file = os.path.join(layout.row_dir(workdir, "transformer"), logging.METRICS_FILE)
    before = open(metrics_file).read()

    def no_training(**kwargs):
        raise AssertionError("run_loop called on a finished workdir")

    monkeypatch.setattr(loop, "run_loop", no_training)
    again = training.train_msbr("transformer", config, workdir, data)
    assert open(metrics_file).read() == before
    np.testing.assert_array_equal(again.id_embedding.embedding[...], model.id_embedding.embedding[...])


def test_a_row_interrupted_between_checkpoints_redoes_its_epochs_and_ends_the_same(tiny, tmp_path, monkeypatch):
    """Saved every 2 epochs, a row that fails after validating epoch 3 (before its save) resumes from
    epoch 2 and redoes epoch 3: its history, selected epoch and parameters are an uninterrupted run's."""
    _, _, data, _, _ = tiny
    config = tpad_base.get_config("tiny")
    config.msbr.max_epochs, config.msbr.patience, config.msbr.checkpoint_every_epochs = 3, 3, 2
    table = tables.SessionTable.every_session(data.train, tables.prefix_width(config))
    steps_per_epoch = tables.training_batches(config, table, 1, config.msbr.sessions_per_batch)[1]
    whole_dir, interrupted_dir = str(tmp_path / "whole"), str(tmp_path / "interrupted")
    reference = training.train_msbr("transformer", config, whole_dir, data)
    whole = selection_lib.read_selection(layout.row_dir(whole_dir, "transformer"))

    saved_steps, real_save = [], checkpointing.save

    def save_or_crash(manager, step, *args, **kwargs):
        if step == 3 * steps_per_epoch:
            raise RuntimeError("simulated crash before the last save")
        saved_steps.append(step)
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save", save_or_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train_msbr("transformer", config, interrupted_dir, data)
    assert saved_steps == [2 * steps_per_epoch]  # epoch 1 is not saved, epoch 2 is
    crashed = selection_lib.read_selection(layout.row_dir(interrupted_dir, "transformer"))
    assert sorted(crashed["history"]) == ["1", "2", "3"] and not crashed["finished"]

    monkeypatch.setattr(checkpointing, "save", real_save)
    resumed = training.train_msbr("transformer", config, interrupted_dir, data)
    again = selection_lib.read_selection(layout.row_dir(interrupted_dir, "transformer"))
    assert again["finished"] and again["history"] == whole["history"]
    assert again["best_epoch"] == whole["best_epoch"]
    params = [jax.tree.leaves(nnx.state(model, nnx.Param)) for model in (resumed, reference)]
    for a, b in zip(*params):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_early_stop_after_patience_epochs_without_improvement(tiny):
    _, workdir, data, _, _ = tiny
    config = tpad_base.get_config("tiny")
    config.msbr.learning_rate = 0.0  # nothing improves after the first epoch
    config.msbr.max_epochs = 5
    training.train_msbr("gru4rec", config, workdir, data)
    selection = selection_lib.read_selection(layout.row_dir(workdir, "gru4rec"))
    assert sorted(int(e) for e in selection["history"]) == [1, 2]
    assert selection["best_epoch"] == 1 and selection["finished"]


def test_content_features_are_normalised_and_frozen(tiny):
    _, workdir, data, _, _ = tiny
    config = tpad_base.get_config("tiny")
    config.msbr.max_epochs = 1
    features = np.random.default_rng(0).normal(size=(data.num_items, 12)).astype(np.float32) * 3.0
    export.write_export(os.path.join(workdir, "export"), features, data.item_ids,
                        _export_meta(config, data, "tpad"))
    model = training.train_msbr("tpad", config, workdir, data)
    assert config.msbr.content_norm == "whiten"
    np.testing.assert_allclose(np.asarray(model.content[...]), features_lib.normalise_content(features, "whiten"),
                               rtol=1e-5, atol=1e-6)
    saved = np.load(os.path.join(layout.row_dir(workdir, "tpad"), layout.BEST_PARAMS))
    assert "content_projection/kernel" in saved.files and "content" not in saved.files
    ranks = training.evaluate_neural("tpad", config, workdir, data)
    assert ranks.shape == data.examples("test")[1].shape and ranks.max() < data.num_items

    export.write_export(os.path.join(workdir, "export_raw"), features, data.item_ids[::-1],
                        _export_meta(config, data, "raw"))
    with pytest.raises(cli.UserError, match="export_raw/item_ids.json"):
        training.train_msbr("transformer+raw", config, workdir, data)
    with pytest.raises(cli.UserError, match="export_stage1/item_embeddings.npy: missing"):
        training.train_msbr("transformer+stage1", config, workdir, data)


def _export_meta(config, data, variant):
    """The export_meta of `variant` exported under `config` from `data` (what runner.write_exports writes)."""
    return {"variant": variant, "inputs": provenance.export_record(config, data.fingerprint, variant)}


def test_l2_normalisation_gives_unit_rows():
    features = np.random.default_rng(0).normal(size=(50, 6)) * np.array([5.0, 1, 1, 1, 1, 0.1])
    unit = features_lib.normalise_content(features, "l2")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, features / np.linalg.norm(features, axis=1, keepdims=True), rtol=1e-6)


def test_whitening_decorrelates_equalises_and_damps_null_directions():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 4))
    # 4 real directions of very different scales, then 2 columns that are exactly zero (a rank-4 export).
    features = np.c_[rng.normal(size=(4000, 4)) * [30.0, 3.0, 1.0, 0.5] @ mixing, np.zeros((4000, 2))] + 7.0
    white = features_lib.normalise_content(features, "whiten", eps=1e-6)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.mean(np.sum(white**2, axis=1)), 1.0, rtol=1e-5)
    covariance = white.T @ white / len(white)
    eigenvalues = np.sort(np.linalg.eigvalsh(covariance))
    # The two null directions stay null (not blown up); the four real ones get equal variance 1/4.
    np.testing.assert_allclose(eigenvalues[:2], 0.0, atol=1e-6)
    np.testing.assert_allclose(eigenvalues[2:], 0.25, rtol=1e-3)
    with pytest.raises(ValueError, match="msbr.content_norm must be one of"):
        features_lib.normalise_content(features, "zscore")


def test_unknown_model_name_is_rejected(tiny):
    config, workdir, data, _, _ = tiny
    with pytest.raises(ValueError, match="unknown neural model 'bert4rec'"):
        training.evaluate_neural("bert4rec", config, workdir, data)



def test_seed_spread_reuses_the_run_and_retrains_only_other_seeds(tiny):
    config, workdir, data, _, _ = tiny
    own = seeds.seed_values("transformer", config, workdir, data)  # restored: the fixture trained it
    selection = selection_lib.read_selection(layout.row_dir(workdir, "transformer"))
    assert own[("valid", "all", "MRR")] == selection["best_metric"]
    ranks = training.evaluate_neural("transformer", config, workdir, data)
    assert own[("test", "all", "HR")] == pytest.approx(float(np.mean(ranks < 20) * 100))

    spread = seeds.seed_spread(["transformer"], config, workdir, data, [config.seed + 1])
    other_dir = os.path.join(workdir, "seeds", f"seed{config.seed + 1}")
    assert os.path.islink(os.path.join(other_dir, "data"))
    assert selection_lib.read_selection(layout.row_dir(other_dir, "transformer"))["finished"]
    values = spread["transformer"]
    assert [v[0] for v in values.values()] == [own[c] for c in seeds.COLUMNS]
    assert values[("valid", "all", "MRR")][0] != values[("valid", "all", "MRR")][1]  # another init, another model
    text = seeds.write_spread(spread, [config.seed, config.seed + 1], os.path.join(workdir, "results"))
    mean = np.mean(values[("test", "all", "HR")])
    assert "| transformer | " in text and f"{mean:.2f} +- " in text
    with pytest.raises(ValueError, match="the run's own seed"):
        seeds.seed_spread(["transformer"], config, workdir, data, [config.seed])


def test_row_config_overrides_only_its_row():
    config = tpad_base.get_config("tiny")
    config.msbr.per_model.gru4rec.learning_rate = 0.01
    config.msbr.per_model.gru4rec.hidden_dim = 48
    config.msbr.per_model.gru4rec.max_epochs = 5
    gru4rec = settings_lib.row_config("gru4rec", config).msbr
    settings = ("learning_rate", "hidden_dim", "dropout", "max_epochs", "patience")
    # dropout and patience: the tiny preset's msbr.*
    assert [gru4rec[key] for key in settings] == [0.01, 48, 0.1, 5, 1]
    transformer = settings_lib.row_config("transformer", config).msbr
    assert [transformer[key] for key in settings] == [3e-3, 32, 0.1, 2, 1]
    assert "per_model" not in gru4rec and "per_model" not in transformer
    assert settings_lib.row_config("gru4rec", settings_lib.row_config("gru4rec", config)).msbr == gru4rec
    assert settings_lib.encoder_config("gru4rec", config).hidden_dim == 48
    assert settings_lib.encoder_config("transformer", config).hidden_dim == 32
    assert config.msbr.learning_rate == 3e-3 and config.msbr.per_model.gru4rec.learning_rate == 0.01


def test_a_row_reads_its_features_under_its_own_content_norm():
    """`msbr.per_model.<row>.content_norm`: unit rows for that row, the preset's whitening (centred and
    decorrelated over the catalogue) for the others."""
    config = tpad_base.get_config("tiny")
    config.msbr.per_model.tpad.content_norm = "l2"
    # Scales far above whitening's damping floor (1e-3 of the largest variance).
    features = np.random.default_rng(0).normal(size=(40, 6)) * np.array([3.0, 2.5, 2.0, 1.5, 1.2, 1.0]) + 1.0
    tpad = settings_lib.model_factory("tpad", config, 40, features)()
    np.testing.assert_allclose(np.asarray(tpad.content[...]),
                               features / np.linalg.norm(features, axis=1, keepdims=True), rtol=1e-5)
    stage1 = np.asarray(settings_lib.model_factory("transformer+stage1", config, 40, features)().content[...],
                        np.float64)
    np.testing.assert_allclose(stage1.mean(axis=0), 0.0, atol=1e-5)
    covariance = stage1.T @ stage1 / len(stage1)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0.0, atol=1e-5)  # decorrelated
    # Equal variances, but for the damping of the smaller directions (at most 2 % here).
    np.testing.assert_allclose(np.diag(covariance), np.diag(covariance).max(), rtol=0.02)


def test_a_row_setting_changes_that_rows_record_only():
    data = types.SimpleNamespace(fingerprint="f" * 64)  # ID-only rows read no export
    config = tpad_base.get_config("tiny")
    before = {name: selection_lib.inputs_record(name, config, "unused", data) for name in ("gru4rec", "srgnn")}
    config.msbr.per_model.gru4rec.dropout = 0.3
    after = {name: selection_lib.inputs_record(name, config, "unused", data) for name in ("gru4rec", "srgnn")}
    assert after["srgnn"] == before["srgnn"]
    assert provenance.differences(before["gru4rec"], after["gru4rec"]) == "msbr.dropout 0.1 -> 0.3"
    assert not any(key.startswith("msbr.per_model") for key in after["gru4rec"]["config"])


def test_per_model_rejects_unknown_rows_and_settings():
    config = tpad_base.get_config("tiny")
    config.msbr.per_model["bert4rec"] = {"learning_rate": 0.1}
    config.msbr.per_model.gru4rec["num_layers"] = 3
    with pytest.raises(cli.UserError, match=r"unknown row 'bert4rec'; gru4rec.num_layers: not a per-row"):
        settings_lib.row_config("transformer", config)


def test_per_model_section_covers_every_row_and_takes_command_line_overrides():
    assert sorted(tpad_base.get_config().msbr.per_model.keys()) == sorted(rows.names(rows.neural()))
    assert tuple(tpad_base.ROW_SETTING_TYPES) == settings_lib.ROW_SETTINGS
    tiny = tpad_base.get_config("tiny").msbr.per_model
    assert all(value is None for row in tiny.values() for value in row.values())
    base = tpad_base.get_config().msbr.per_model
    assert {row: {k: v for k, v in settings.items() if v is not None} for row, settings in base.items()
            if any(v is not None for v in settings.values())} == tpad_base.TUNED_ROWS
    parsed = _parse_config("--config.msbr.per_model.gru4rec.learning_rate=0.02",
                           '--config.msbr.per_model["srgnn+tpad"].hidden_dim=16')
    assert settings_lib.row_config("gru4rec", parsed).msbr.learning_rate == 0.02
    assert settings_lib.encoder_config("srgnn+tpad", parsed).hidden_dim == 16
    assert settings_lib.encoder_config("srgnn", parsed).hidden_dim == 32
    with pytest.raises(AttributeError):  # the config is locked: a misspelled setting fails
        _parse_config("--config.msbr.per_model.gru4rec.lr=0.02")


def _parse_config(*overrides):
    """The tiny preset as `--config configs/tpad_base.py:tiny` with `overrides` gives it (locked)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "tpad_base.py")
    argv = ["prog", f"--config={path}:tiny", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_a_row_trains_and_serves_with_its_own_hidden_size(tiny, monkeypatch):
    _, workdir, data, _, _ = tiny
    config = tpad_base.get_config("tiny")
    config.msbr.per_model.srgnn.hidden_dim = 16
    config.msbr.per_model.srgnn.max_epochs = 1
    model = training.train_msbr("srgnn", config, workdir, data)
    assert model.id_embedding.embedding[...].shape == (data.num_items, 16)
    selection = selection_lib.read_selection(layout.row_dir(workdir, "srgnn"))
    assert selection["inputs"]["config"]["msbr.hidden_dim"] == 16 and list(selection["history"]) == ["1"]

    def no_training(**kwargs):
        raise AssertionError("run_loop called for a row whose settings did not change")

    monkeypatch.setattr(loop, "run_loop", no_training)
    config.msbr.per_model.transformer.learning_rate = 0.5  # another row's setting: srgnn is served as is
    served = serving.load_selected("srgnn", config, workdir, data)
    np.testing.assert_array_equal(served.id_embedding.embedding[...], model.id_embedding.embedding[...])
    config.msbr.per_model.srgnn.hidden_dim = 24
    with pytest.raises(cli.UserError, match=r"msbr.hidden_dim 16 -> 24"):
        serving.load_selected("srgnn", config, workdir, data)


def _tune_script():
    """benchmarks/tune.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "tune.py")
    spec = importlib.util.spec_from_file_location("tune", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coordinate_search_takes_each_setting_in_turn():
    calls = []
    scores = {(1, 10, 0): 1.0, (2, 10, 0): 3.0, (3, 10, 0): 3.0, (2, 20, 1): 4.0}

    def score(settings):
        calls.append((settings["a"], *settings[("b", "c")]))
        return scores[calls[-1]]

    tune = _tune_script()
    chosen, tried = tune.coordinate_search(score, (("a", (1, 2, 3)), (("b", "c"), ((10, 0), (20, 1)))))
    assert chosen == {"a": 2, ("b", "c"): (20, 1)}  # a: 2 and 3 tie, the earlier value stays
    assert calls == [(1, 10, 0), (2, 10, 0), (3, 10, 0), (2, 20, 1)]  # (2, 10, 0) is not trained twice
    assert [value for _, value in tried] == [1.0, 3.0, 3.0, 4.0]
    assert tune.row_settings(chosen) == {"a": 2, "b": 20, "c": 1}
