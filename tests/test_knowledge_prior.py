"""K's knowledge prior (`model.knowledge_prior`): a frozen sentence embedding per item added to e_K through a
trained linear map, filled from MiniLM over each item's text, trained only by K's own terms and alignment,
and given to new items from their records as to the catalogue's. That alignment trains the map:
tests/test_tpad.py."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tpad_base
from tpad_jax import export, layout, new_items, runner, sentence_features
from tpad_jax.cli import UserError
from tpad_jax.data import readonly
from tpad_jax.models import bert, mllm
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.train import inputs as inputs_lib

NUM_ITEMS, LENGTH, VOCAB, PRIOR = 6, 7, 30, 5


def text_only_model(prior, embed_dim=4):
    """A text-only TPAD over `NUM_ITEMS` random item prompts, its prior table filled with `prior`."""
    text_only = dataclasses.replace(mllm.MLLMConfig.tiny(VOCAB), vision=None)
    cfg = tpad_lib.TPADConfig(mllm=text_only, embed_dim=embed_dim, image_token_id=3, num_items=NUM_ITEMS,
                              item_prompt_length=LENGTH, item_visual_tokens=0, prior_dim=prior.shape[1])
    model = tpad_lib.TPAD(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = {"tokens": rng.integers(6, VOCAB, (NUM_ITEMS, LENGTH)).astype(np.int32),
               "attention_mask": np.ones((NUM_ITEMS, LENGTH), bool),
               "loss_mask": np.zeros((NUM_ITEMS, LENGTH), bool), "item_pos": np.full(NUM_ITEMS, LENGTH - 1)}
    nnx.update(model, tpad_lib.table_state(model, prompts, np.zeros(NUM_ITEMS, bool), None, prior=prior))
    return model


def test_e_k_adds_each_items_prior_through_the_linear_map():
    prior = np.random.default_rng(1).normal(size=(NUM_ITEMS, PRIOR)).astype(np.float32)
    rows = jnp.array([4, 0, 2])
    with_prior = np.asarray(tpad_lib.item_forward(text_only_model(prior), rows)[1])
    without = np.asarray(tpad_lib.item_forward(text_only_model(np.zeros_like(prior)), rows)[1])
    head = text_only_model(prior).prior_head
    kernel = np.asarray(head.kernel.get_value())
    # The same towers (seed 0) on the same prompts: the difference is the prior's map, without its bias.
    # The prior's unit rows are scaled by sqrt(width) to the unit coordinate scale of K's hidden states.
    np.testing.assert_allclose(with_prior - without, np.sqrt(PRIOR) * prior[[4, 0, 2]] @ kernel, rtol=1e-5,
                               atol=1e-5)


def test_untrained_k_embeds_each_item_as_its_prior_when_the_widths_agree():
    prior = np.random.default_rng(2).normal(size=(NUM_ITEMS, 4)).astype(np.float32)
    prior /= np.linalg.norm(prior, axis=1, keepdims=True)
    e_k = np.asarray(tpad_lib.item_forward(text_only_model(prior), jnp.array([3, 1, 5]))[1])
    np.testing.assert_allclose(e_k, 2.0 * prior[[3, 1, 5]], rtol=1e-6, atol=1e-6)  # sqrt(4) x the prior


def test_a_model_with_a_prior_refuses_tables_without_one():
    model = text_only_model(np.zeros((NUM_ITEMS, PRIOR), np.float32))
    prompts = {name: np.asarray(model.tables[name][...]) for name in tpad_lib.ITEM_PROMPT_FIELDS}
    with pytest.raises(ValueError, match="knowledge prior"):
        tpad_lib.table_state(model, prompts, np.zeros(NUM_ITEMS, bool), None)


def test_an_unknown_prior_is_named_in_one_line():
    config = tpad_base.get_config("tiny")
    config.model.knowledge_prior = "glove"
    with pytest.raises(UserError, match=r"^model.knowledge_prior='glove': choose '' \(none\) or 'minilm'$"):
        sentence_features.prior_dim(config)


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """(config, workdir) of a tiny run with the MiniLM prior: stage 1 and its export (stage 2's K carries
    the prior the same way, and costs the suite another training)."""
    config = tpad_base.get_config("tiny")
    config.model.knowledge_prior = "minilm"
    config.eval.models = ("transformer+stage1",)
    workdir = str(tmp_path_factory.mktemp("prior_run"))
    runner.run(config, workdir, stage="export")
    return config, workdir


def test_the_prior_table_holds_minilm_of_each_items_title_and_category(prior_run):
    config, workdir = prior_run
    data = readonly.load(config, workdir)
    texts = [f"{title}. Category: {category}." if category else title
             for title, category in zip(data.titles, data.categories)]
    expected = bert.MiniLMEncoder.from_installed_wheel().encode(texts)
    inputs = inputs_lib.build_inputs(config, workdir, data)
    model = inputs.make_model()
    inputs.initialize(model)
    table = np.asarray(model.tables["prior"][...])
    np.testing.assert_allclose(table[:data.num_items], expected, atol=1e-5)
    # Written once as the MiniLM export, read back after that.
    cached, item_ids, _ = export.load_export(layout.export_dir(workdir, "minilm"))
    np.testing.assert_allclose(cached, expected, atol=1e-5)
    assert item_ids == list(data.item_ids)


def test_new_items_get_their_prior_from_their_records(prior_run, tmp_path):
    config, workdir = prior_run
    data = readonly.load(config, workdir)
    rows = [0, 1, 2]
    records = [{"item_id": data.item_ids[row], "title": data.titles[row], "category": data.categories[row],
                "image": os.path.relpath(data.image_paths[row], data.raw_dir)} for row in rows]
    os.makedirs(tmp_path / "images")
    for row in rows:
        shutil.copy(data.image_paths[row], tmp_path / "images")
    records = [{**record, "image": "images/" + os.path.basename(record["image"])} for record in records]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    new_items.embed_new_items(config, workdir, str(tmp_path / "items.jsonl"), str(tmp_path / "out"),
                              "transformer+stage1")
    catalogue, _, _ = export.load_export(layout.export_dir(workdir, "stage1"))
    again, _, _ = export.load_export(str(tmp_path / "out"))
    np.testing.assert_allclose(again, catalogue[rows], atol=1e-5, rtol=1e-5)
