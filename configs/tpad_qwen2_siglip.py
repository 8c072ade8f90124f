"""TPAD with SigLIP-base-224 + Qwen2-0.5B towers: the mid-size run for one GPU or TPU host.

Usage:
  python launch/train.py --config configs/tpad_qwen2_siglip.py --workdir runs/qwen2 \
      --config.data.raw_dir=path/to/catalogue

The recipe of `configs/tpad_llava7b.py` (bf16, remat, scanned layers, LoRA 16/32 on every projection,
prompt budgets) on a model 12x smaller. `model.checkpoint_dir` is a local LLaVA-layout HF directory
(config.json with a SigLIP `vision_config` and a Qwen2 `text_config`, *.safetensors, tokenizer.json,
which is adopted as the run's tokenizer). `arg` selects the mesh: `dp` (default: replicate the
1.2 GB bf16 base, split the batch over every device of the host) or `fsdp` (shard it, for 16 GB chips).
"""

import pathlib
import runpy

MESHES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1)}


def get_config(arg=None):
    mesh = arg or "dp"
    if mesh not in MESHES:
        raise ValueError(f"unknown mesh {mesh!r} for tpad_qwen2_siglip.py; choose from {sorted(MESHES)}")
    # configs/ is a folder of scripts, not a package: run the 7B config by path and shrink it.
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("tpad_llava7b.py")))["get_config"]()
    c.preset = f"qwen2_siglip:{mesh}"

    c.data.image_size = 224
    c.data.item_visual_tokens = 49  # 7 x 7 pooled from SigLIP's 14 x 14 patch grid

    c.model.preset = "qwen2_0_5b_siglip"
    c.model.checkpoint_dir = "checkpoints/qwen2-0.5b-siglip"
    c.model.embed_dim = 128

    c.stage1.batch_size = 128
    c.stage1.learning_rate = 5e-4
    c.stage2.batch_size = 32
    c.stage2.learning_rate = 5e-4
    c.stage2.knowledge_learning_rate = 2e-4
    c.stage2.keep_batch_size = 16

    c.mesh.shape = MESHES[mesh]
    return c
