"""What every TPAD stage shares: prepared data, tokenizer, model config, per-item tables, mesh."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from tpad_jax.data import pipeline, prepared, prompts, tokenizer as tokenizer_lib
from tpad_jax import pretrained, rows, sentence_features
from tpad_jax.models import tpad as tpad_lib
from tpad_jax.parallel import mesh as mesh_lib
from tpad_jax.parallel import rules as rules_lib
from tpad_jax.train import vision_cache

VISION_BATCH = 64  # pictures per batch of the frozen ViT's one pass over the catalogue


@dataclasses.dataclass
class StageInputs:
    """The catalogue, the tokenizer, the TPAD config, the per-item tables, the mesh and its rules."""

    config: object
    workdir: str
    data: prepared.PreparedData
    tokenizer: object
    tpad_cfg: tpad_lib.TPADConfig
    item_prompts: dict  # rows-indexed numpy arrays of the item prompts
    has_image: np.ndarray  # bool [N]
    mesh: jax.sharding.Mesh
    rules: tuple

    def make_model(self) -> tpad_lib.TPAD:
        """A fresh TPAD model; the seed fixes the random base, so every stage sees the same one."""
        return tpad_lib.TPAD(self.tpad_cfg, rngs=nnx.Rngs(self.config.seed))

    def initialize(self, model: tpad_lib.TPAD) -> None:
        """Readies a fresh `model`: real base weights when configured, then the per-item constants (the
        knowledge prior among them, `sentence_features.prior_features`).

        The checkpoint (config.model.gguf_path / checkpoint_dir) is loaded first, so the frozen ViT
        features of the item table come from the real ViT; they are computed once per workdir over the
        pictures streamed from the TFDS item table (`pipeline.item_batches`, one batch in memory), each
        process for the rows it holds, and read back from disk after that (`vision_cache`).
        """
        pretrained.load_base(model, self.config.model, tokenizer_lib.special_ids(self.tokenizer))
        vision, vision_rows = None, None
        if self.tpad_cfg.item_visual_tokens:
            # Each process computes the rows its devices hold of the (row-split) vision table, on its
            # own devices: a data-parallel pass, and per-process work that falls with the processes.
            vision_rows = mesh_lib.held_rows(model.tables["vision"][...], self.data.num_items)
            if len(vision_rows):
                vision = vision_cache.load_or_compute(
                    self.workdir, self.vision_record(), vision_rows,
                    lambda: self._vision_features(model, vision_rows))
        prior = sentence_features.prior_features(self.config, self.workdir, self.data)
        nnx.update(model, tpad_lib.table_state(model, self.item_prompts, self.has_image, vision, vision_rows,
                                               prior))

    def vision_record(self) -> dict:
        """What shapes the frozen ViT's features: the record of the untrained towers (the data, the model
        with its base, checkpoint, image size and tokens per item, and the seed of a random base)."""
        from tpad_jax import provenance  # noqa: PLC0415  (provenance imports the stages, which import this)

        return provenance.stage_record(self.config, self.data.fingerprint, rows.RAW)

    def _vision_features(self, model: tpad_lib.TPAD, rows: np.ndarray) -> np.ndarray:
        pictures = pipeline.item_batches(
            self.config, self.data, self.tokenizer, self.tpad_cfg.item_visual_tokens, VISION_BATCH,
            shuffle=False, repeat=False, seed=0, process_index=0, process_count=1,
            prompts=self.item_prompts, rows=rows)
        return tpad_lib.vision_features_of_batches(model.towers, pictures, rows,
                                                   self.tpad_cfg.item_visual_tokens)


def tpad_config(config, data, tokenizer) -> tpad_lib.TPADConfig:
    """The TPAD model shape of `config` over the catalogue `data` and its `tokenizer`.

    A catalogue without any image builds no vision tower (`mllm.vision` is None, no image slots).
    """
    with_images = bool(np.any(data.has_image))
    mllm_cfg = pretrained.mllm_config(config.model, vocab_size=tokenizer.get_vocab_size(),
                                      image_size=config.data.image_size, with_images=with_images)
    if not with_images:
        mllm_cfg = dataclasses.replace(mllm_cfg, vision=None)
    n_img = min(config.data.item_visual_tokens, mllm_cfg.vision.num_features) if with_images else 0
    return tpad_lib.TPADConfig(
        mllm=mllm_cfg, embed_dim=config.model.embed_dim, image_token_id=tokenizer_lib.special_ids(tokenizer)[
            "image"], num_items=data.num_items,
        item_prompt_length=prompts.item_prompt_length(n_img, config.data.max_item_tokens),
        item_visual_tokens=n_img, table_rows=table_rows(config, data.num_items),
        prior_dim=sentence_features.prior_dim(config))


def table_rows(config, num_items: int) -> int:
    """`num_items` rounded up to a multiple of the shards the item tables' rows are split into."""
    sizes = dict(zip(config.mesh.axes, mesh_lib.resolve_mesh_shape(config.mesh.shape, jax.device_count())))
    multiple = rules_lib.rows_multiple((tpad_lib.TABLE_AXIS,), rules_lib.get_rules(config.mesh.rules), sizes)
    return -(-num_items // multiple) * multiple


def build_inputs(config, workdir: str, data=None) -> StageInputs:
    """Prepares data and tokenizer when needed and tokenizes every item prompt once.

    `data`: the prepared data when the caller has already loaded it (else loaded or prepared here).
    """
    data = prepared.load_or_prepare(config, workdir) if data is None else data
    tokenizer = tokenizer_lib.tokenizer_for(config, data, workdir,
                                            pretrained.tokenizer_source(config, workdir))
    tpad_cfg = tpad_config(config, data, tokenizer)
    n_img = tpad_cfg.item_visual_tokens
    item_prompts = pipeline.item_prompt_table(config, data, tokenizer, n_img)
    return StageInputs(config=config, workdir=workdir, data=data, tokenizer=tokenizer, tpad_cfg=tpad_cfg,
                       item_prompts=item_prompts, has_image=np.asarray(data.has_image, bool),
                       mesh=mesh_lib.make_mesh(config.mesh), rules=rules_lib.get_rules(config.mesh.rules))
