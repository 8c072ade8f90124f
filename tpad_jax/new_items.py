"""Items outside the training catalogue: their e_K from the trained Knowledge-MLLM, written as an export.

TPAD's item representation is K's state at `<item>` after the item's image and text, so an item the
run never saw still gets one: its prompt is tokenised with the run's own tokenizer (DIR/data/
tokenizer.json; a byte-level BPE has every byte, so unknown words split into smaller pieces instead of
failing), its image is encoded and decoded as the catalogue's were (`tfds_builder.encoded_image`, the
TFDS image decoder, `pipeline.to_pixels`) and read by the ViT (which no loss trains, so it is the one
that made the catalogue's image features), and K runs over the prompt as the export does
(`export.item_embeddings` over tables holding the new items). An item of the catalogue sent through this
path gets its exported row back, to float tolerance (tests/test_embed_items.py).

The K that runs is the one that wrote the export a model reads (`rows.ROWS`): for `tpad`,
DIR/export, written by the stage-2 model of DIR/stage2/. Its checkpoint is restored at the step the
export records, and the config must be the one that trained it (`provenance.check_export`). The MiniLM
export (`transformer+minilm`, and the features of `transformer+minilm+tpad-knn`) embeds new items with
the same frozen sentence encoder that made it (`SentenceEmbedder`); `embedder` picks the one an export
needs.

The written export (`embed_new_items`) has the three files of any export plus, in export_meta.json,
`new_items: true`, the catalogue export it extends, its `inputs` record (so a reader can check that the
same K made both) and the items' titles. It is never written inside DIR/export* or as DIR itself.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from tpad_jax import export, layout, pretrained, provenance, rows, sentence_features
from tpad_jax.cli import UserError
from tpad_jax.data import pipeline, prompts, raw, readonly, tfds_builder
from tpad_jax.data import tokenizer as tokenizer_lib
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import inputs as inputs_lib
from tpad_jax.train import loop, stages

# Decodes the stored image bytes as the item table's reader does (OpenCV when installed, else PIL).
_IMAGE_FEATURE = tfds.features.Image(shape=(None, None, 3))


@dataclasses.dataclass(frozen=True)
class NewItems:
    """Items read from an items.jsonl (in file order) and their e_K [M, d] float32."""

    item_ids: list
    titles: list
    embeddings: np.ndarray


def read_items(path: str) -> tuple[list, list]:
    """The records of a canonical items.jsonl, with image paths made absolute, and their line numbers.

    Image paths resolve inside the file's directory (`raw.read_items`, which raises
    `file:line: field 'x': ...` for the first bad record).
    """
    items = raw.read_items(path)
    lines = [line for line, _ in raw.json_lines(path)]  # every line was one record, or it would have raised
    catalogue_dir = os.path.dirname(os.path.abspath(path))
    items = [dataclasses.replace(item, image=None if item.image is None else os.path.join(catalogue_dir,
                                                                                           item.image))
             for item in items]
    return items, lines


def _checked_export(config, workdir: str, data, variant: str) -> tuple[str, dict]:
    """(directory, meta) of the whole export of `variant`, made from `config` on this data (else UserError)."""
    directory = layout.export_dir(workdir, variant)
    if not export.is_complete(directory):
        raise UserError(f"{directory}/{export.META_FILE}: missing; run the stage that exports these "
                        "features first")
    meta = export.load_meta(directory)
    provenance.check_export(directory, config, data.fingerprint)
    return directory, meta


def embedder(config, workdir: str, data, variant: str):
    """What embeds new items as the export of `variant` was made: the K that wrote it (`KnowledgeEmbedder`),
    or the frozen sentence encoder of the MiniLM export (`SentenceEmbedder`).

    Raises:
      UserError for the synthetic catalogue's true attributes (a new item has none) or an export that is
      missing or was made from other inputs.
    """
    source = rows.export_variant(variant).source
    if source == rows.ATTRIBUTES:
        raise UserError(f"{layout.export_dir(workdir, variant)}: exported from the synthetic catalogue's "
                        "true attributes, which an item outside the catalogue does not have; new items are "
                        "embedded by the Knowledge-MLLM or MiniLM")
    return (SentenceEmbedder if source == rows.MINILM else KnowledgeEmbedder)(config, workdir, data, variant)


class SentenceEmbedder:
    """The MiniLM export's encoder: new items get all-MiniLM-L6-v2 of their title and category, as the
    catalogue's items did (`sentence_features.item_text`). It reads no images, as it read none of the
    catalogue's."""

    def __init__(self, config, workdir: str, data, variant: str):
        self.export_dir, self.meta = _checked_export(config, workdir, data, variant)

    def embed(self, items, lines, path: str) -> NewItems:  # noqa: ARG002  (as KnowledgeEmbedder.embed)
        """The MiniLM embeddings of `read_items(path)`'s `items`."""
        embeddings = sentence_features.encode(
            [sentence_features.item_text(item.title or "", item.category) for item in items])
        return NewItems([item.item_id for item in items], [item.title or "" for item in items], embeddings)


class KnowledgeEmbedder:
    """The trained K of one export of a workdir, ready to embed item records."""

    def __init__(self, config, workdir: str, data, variant: str):
        """Restores the model that wrote the export of `variant`, a tower's (raises UserError when it
        cannot be had)."""
        self.export_dir, self.meta = _checked_export(config, workdir, data, variant)
        variant = self.meta.get("variant")
        tokenizer_path = layout.tokenizer_file(workdir)
        if not os.path.exists(tokenizer_path):
            raise UserError(f"{tokenizer_path}: missing; the run's tokenizer is written by launch/train.py")
        self.config = config
        self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
        self.vocab = prompts.prompt_vocab(self.tokenizer)
        tpad_cfg = inputs_lib.tpad_config(config, data, self.tokenizer)
        if tpad_cfg.item_visual_tokens and config.model.full_finetune and config.train.weight_decay:
            # The catalogue's image features are a table the ViT computed once, before training; the ViT
            # gets no gradient, so only weight decay on a full fine-tune moves it away from that table.
            raise UserError(f"{self.export_dir}: trained with model.full_finetune and train.weight_decay="
                            f"{config.train.weight_decay}, which changed the ViT after it made the "
                            "catalogue's image features; new items' images cannot be read as those were")
        # The stage specs read only the config, data, tokenizer, mesh and model factory of their inputs.
        inputs = inputs_lib.StageInputs(
            config=config, workdir=workdir, data=data, tokenizer=self.tokenizer, tpad_cfg=tpad_cfg,
            item_prompts=None, has_image=np.asarray(data.has_image, bool),
            mesh=mesh_lib.make_mesh(config.mesh), rules=rules_lib.get_rules(config.mesh.rules))
        self.model = self._restore(inputs, variant)

    def _restore(self, inputs, variant: str) -> tpad_lib.TPAD:
        source = rows.export_variant(variant).source

        def load_base(model):  # the untrained towers, as runner.train_towers makes them, without tables
            pretrained.load_base(model, self.config.model, tokenizer_lib.special_ids(self.tokenizer))

        if source == rows.RAW:
            model = inputs.make_model()
            load_base(model)
            return model
        spec = stages.stage1_spec(inputs) if source == rows.STAGE1 else stages.stage2_spec(
            inputs, None, variant)
        stage_dir = layout.stage_dir(inputs.workdir, variant)
        step = self.meta.get("checkpoint_step")
        try:
            # The checkpoint leaves out the frozen base, rebuilt here, and the catalogue's tables, which
            # new items do not read. Stage 2 trains every parameter stage 1 did, so its checkpoint
            # alone gives the trained towers.
            state = loop.load_train_state(workdir=stage_dir, mesh=inputs.mesh, rules=inputs.rules,
                                          make_model=inputs.make_model, tx=spec.tx, wrt=spec.wrt,
                                          init_fn=load_base, constants=tpad_lib.ItemTable, step=step)
        except FileNotFoundError as error:
            raise UserError(f"{stage_dir}/checkpoints: no checkpoint at step {step}, the step "
                            f"{self.export_dir} was exported from ({error})") from error
        return state.model

    def embed(self, items, lines, path: str) -> NewItems:
        """The e_K of `read_items(path)`'s `items` (raises `path:line: field 'image'` when the towers
        read no images and an item has one)."""
        n_img = self.model.cfg.item_visual_tokens
        texts = tokenizer_lib.encode(self.tokenizer, [prompts.title_text(item.title or "") for item in items])
        categories = tokenizer_lib.encode(
            self.tokenizer, [prompts.title_text(item.category) if item.category else "" for item in items])
        has_image = np.array([item.image is not None for item in items], bool)
        rows = [prompts.item_prompt(self.vocab, title, category, bool(image), n_img=n_img,
                                    max_item_tokens=self.config.data.max_item_tokens)
                for title, category, image in zip(texts, categories, has_image)]
        values = {name: np.stack([row[name] for row in rows]) for name in tpad_lib.ITEM_PROMPT_FIELDS}
        values["has_image"] = has_image
        if self.model.cfg.mllm.vision is None:
            for item, line in zip(items, lines):
                if item.image is not None:
                    raise raw.RawFormatError(path, line, "image", "the run's towers read no images (its "
                                             "catalogue has none); give this item without an image")
        if n_img:
            values["vision"] = tpad_lib.vision_features(self.model.towers, self._pixels(items), n_img)
        if self.model.cfg.prior_dim:  # K's knowledge prior of each new item, from the same frozen encoder
            values["prior"] = sentence_features.encode(
                [sentence_features.item_text(item.title or "", item.category) for item in items])
        for name, value in values.items():
            variable = self.model.tables[name]
            old = variable.get_value()
            # Other rows than the catalogue's: whole on every device of the model's mesh.
            where = old.sharding
            if isinstance(where, jax.sharding.NamedSharding):
                where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
            variable.set_value(jax.device_put(jnp.asarray(value, old.dtype), where))
        embeddings = export.item_embeddings(self.model, self.config.eval.batch_size, num_items=len(items))
        return NewItems([item.item_id for item in items], [item.title or "" for item in items], embeddings)

    def _pixels(self, items) -> np.ndarray:
        """float32 [M, S, S, 3] in [-1, 1] (zeros without an image), as the catalogue's were made."""
        size = self.config.data.image_size
        pixels = np.zeros((len(items), size, size, 3), np.float32)
        for row, item in enumerate(items):
            if item.image is not None:
                stored = tfds_builder.encoded_image(item.image, item_id=item.item_id)
                pixels[row] = pipeline.to_pixels(_IMAGE_FEATURE.decode_example_np(stored), size)
        return pixels


def check_out_dir(workdir: str, out_dir: str) -> None:
    """Raises UserError when `out_dir` is the run directory or inside one of its exports (DIR/export*)."""
    run, out = os.path.realpath(workdir), os.path.realpath(out_dir)
    relative = os.path.relpath(out, run)
    if out == run or (not relative.startswith(os.pardir) and layout.is_export_name(relative.split(os.sep)[0])):
        raise UserError(f"{out_dir}: the run's own directory or exports are never written; name a directory "
                        "outside DIR/export*")


def write_new_items(out_dir: str, new: NewItems, made_by, items_path: str) -> None:
    """Writes `new`, embedded by `made_by` (`embedder`), as an export (item_embeddings.npy, item_ids.json,
    export_meta.json) to `out_dir`."""
    source = made_by.meta
    meta = {"variant": source.get("variant"), "new_items": True, "items_file": os.path.abspath(items_path),
            "catalogue_export": os.path.abspath(made_by.export_dir),
            "checkpoint_step": source.get("checkpoint_step"),
            "dataset_fingerprint": source.get("dataset_fingerprint"), "inputs": source.get("inputs"),
            "titles": new.titles}
    export.write_export(out_dir, new.embeddings, new.item_ids, meta)


def load_new_items(directory: str) -> tuple[NewItems, dict]:
    """(items, meta) of an export written by `write_new_items`."""
    if not export.is_complete(directory):
        raise UserError(f"{directory}/{export.META_FILE}: missing; launch/embed_items.py writes new items")
    embeddings, item_ids, meta = export.load_export(directory)
    if not meta.get("new_items"):
        raise UserError(f"{directory}: not an export of new items (launch/embed_items.py writes those)")
    return NewItems(list(item_ids), list(meta["titles"]), embeddings), meta



def content_export(model: str) -> str:
    """The export variant whose features the neural model `model` reads.

    Raises:
      UserError for an unknown model or an ID-only one (it has nothing to score a new item by).
    """
    variant = rows.neural_row(model).export
    if variant is None:
        raise UserError(f"model {model!r} reads no content features (ID only): it cannot score an item "
                        "outside its catalogue; choose a content model such as 'tpad'")
    return variant


def embed_new_items(config, workdir: str, items_path: str, out_dir: str, model: str = "tpad") -> NewItems:
    """Embeds the items of `items_path` with the K whose export `model` reads and writes them to `out_dir`.

    Reads the workdir only (`readonly.load`); `out_dir` must lie outside DIR/export* (`check_out_dir`).
    """
    check_out_dir(workdir, out_dir)
    items, lines = read_items(items_path)  # a bad record fails before the model is restored
    made_by = embedder(config, workdir, readonly.load(config, workdir), content_export(model))
    new = made_by.embed(items, lines, items_path)
    write_new_items(out_dir, new, made_by, items_path)
    return new
