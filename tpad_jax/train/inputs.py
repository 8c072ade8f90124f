"""What every TPAD stage needs besides its own batches: data, tokenizer, model config, item tables."""

import dataclasses
import os

import numpy as np

from tpad_jax.data import pipeline, prepared, prompts, tokenizer as tokenizer_lib
from tpad_jax.models import mllm
from tpad_jax.models.tpad import TPADConfig


@dataclasses.dataclass
class StageInputs:
    """The catalogue and the static, per-item tables the stages index by item row."""

    config: object
    workdir: str
    data: prepared.PreparedData
    tokenizer: object
    special: dict
    tpad_cfg: TPADConfig
    item_visual_tokens: int  # visual tokens per item in item prompts (pooled patch grid)
    item_table: dict  # tokenized item prompts of every item: rows-indexed numpy arrays
    pixels: np.ndarray | None  # [N, H, W, 3] in [-1, 1], None for text-only catalogues
    has_image: np.ndarray  # bool [N]


def build_inputs(config, workdir: str) -> StageInputs:
    """Prepares data and tokenizer if needed and tokenizes every item prompt once."""
    data = prepared.load_or_prepare(config, workdir)
    tok = tokenizer_lib.load_or_train(config, workdir, data)
    special = tokenizer_lib.special_ids(tok)
    with_images = bool(np.any(data.has_image))
    mllm_cfg = mllm.MLLMConfig.preset(config.model.preset, vocab_size=tok.get_vocab_size(),
                                      image_size=config.data.image_size, with_vision=with_images)
    mllm_cfg = mllm_cfg.replace(lora_rank=config.model.lora_rank, lora_alpha=config.model.lora_alpha,
                                lora_targets=tuple(config.model.lora_targets),
                                share_base=config.model.share_base, remat=config.model.remat,
                                scan_layers=config.model.scan_layers)
    n_img = min(config.data.item_visual_tokens, mllm_cfg.num_visual_tokens) if with_images else 0
    tpad_cfg = TPADConfig(mllm=mllm_cfg, embed_dim=config.model.embed_dim,
                          image_token_id=special["<image>"])
    item_table = prompts.item_prompt_table(data, tok, n_img=n_img,
                                           max_item_tokens=config.data.max_item_tokens)
    pixels = pipeline.item_pixel_table(config, data) if with_images else None
    return StageInputs(config=config, workdir=workdir, data=data, tokenizer=tok, special=special,
                       tpad_cfg=tpad_cfg, item_visual_tokens=n_img, item_table=item_table,
                       pixels=pixels, has_image=np.asarray(data.has_image, bool))


def stage_dir(workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return path
