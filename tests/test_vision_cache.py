"""The frozen ViT's features on disk: shards read back across layouts, never for other inputs."""

import os
import shutil

import numpy as np
import pytest

from tpad_jax.train import vision_cache

RECORD = {"data_fingerprint": "f", "config": {"seed": 0}}


def _features(rows):
    """Features that name their row: row r is filled with r."""
    return np.repeat(np.asarray(rows, np.float32)[:, None, None], 3, axis=2).repeat(2, axis=1)


def test_shards_of_two_processes_are_read_back_for_any_rows(tmp_path):
    directory = vision_cache.cache_dir(str(tmp_path), RECORD)
    assert vision_cache.read(directory, np.arange(4)) is None  # nothing written yet
    for rows in (np.arange(0, 5), np.arange(5, 10)):  # what two processes hold
        vision_cache.write(directory, rows, _features(rows), RECORD)
    for wanted in (np.arange(10), np.array([3, 4, 5, 6]), np.array([7])):  # another mesh's rows
        np.testing.assert_array_equal(vision_cache.read(directory, wanted), _features(wanted))
    assert vision_cache.read(directory, np.array([9, 10])) is None  # row 10 is in no shard


def test_unfinished_shard_and_other_inputs_are_not_read(tmp_path):
    directory = vision_cache.cache_dir(str(tmp_path), RECORD)
    vision_cache.write(directory, np.arange(4), _features(np.arange(4)), RECORD)
    os.remove(os.path.join(directory, "000000000-4.rows.npy"))  # killed before its rows file
    assert vision_cache.read(directory, np.arange(4)) is None
    other = {"data_fingerprint": "f", "config": {"seed": 1}}
    assert vision_cache.cache_dir(str(tmp_path), other) != directory


def test_a_run_computes_the_features_once_and_reads_them_back(tiny_run, tmp_path, monkeypatch):
    from tpad_jax.models import tpad as tpad_lib
    from tpad_jax.parallel import mesh as mesh_lib
    from tpad_jax.train import inputs as inputs_lib

    config, shared = tiny_run
    config = config.copy_and_resolve_references()
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(shared, "data"), os.path.join(workdir, "data"))  # its prepared data
    assert os.listdir(os.path.join(workdir, "data", vision_cache.DIRECTORY))  # the run kept its features
    shutil.rmtree(os.path.join(workdir, "data", vision_cache.DIRECTORY))
    inputs = inputs_lib.build_inputs(config, workdir)
    assert inputs.tpad_cfg.item_visual_tokens  # the tiny catalogue has pictures

    def initialized():
        model = mesh_lib.sharded_init(inputs.make_model, inputs.mesh, inputs.rules)
        with mesh_lib.activate(inputs.mesh, inputs.rules):
            inputs.initialize(model)
        return np.asarray(mesh_lib.host_values(model.tables["vision"][...]))

    first = initialized()
    assert np.abs(first[:inputs.data.num_items]).sum() > 0

    def no_pass(*args, **kwargs):
        raise AssertionError("the ViT ran again")

    monkeypatch.setattr(tpad_lib, "vision_features_of_batches", no_pass)
    np.testing.assert_array_equal(initialized(), first)
    config.seed = 1  # another random ViT: the features of seed 0 must not be read
    with pytest.raises(AssertionError, match="the ViT ran again"):
        initialized()
