"""TPAD with two LLaVA-1.5-7B towers over one frozen base: the pod-slice / multi-GPU production run.

Usage (see docs/scaling.md for TPU VM and SLURM launch lines):
  python launch/train.py --config configs/tpad_llava7b.py:v5e-64 --workdir gs://BUCKET/runs/llava7b \
      --config.data.raw_dir=path/to/catalogue

`arg` selects the mesh `(data, fsdp, tensor)` for a machine (default `fsdp8`, any device count that 8
divides); `benchmarks/scale_plan.py` prints the memory per device of each one. Real weights:
`model.checkpoint_dir` is a local HF `llava-hf/llava-1.5-7b-hf` directory (config.json,
*.safetensors, tokenizer.json; its tokenizer is adopted unless `data.tokenizer_path` names another),
relative to where the command runs, e.g. fetched once with
  huggingface-cli download llava-hf/llava-1.5-7b-hf --local-dir checkpoints/llava-1.5-7b-hf
Nothing is downloaded at run time. Every field of `configs/tpad_base.py` can still be overridden with
`--config.<path>=value`.
"""

import pathlib
import runpy

# arg -> (mesh.shape, what it is for). FSDP shards the frozen 7B base (14 GB in bf16) and the optimizer
# state; tensor parallelism is only needed once the batch shards would outnumber the sessions of a step.
MESHES = {
    "fsdp8": ((-1, 8, 1), "any multiple of 8 devices: data parallel across groups of 8 FSDP shards"),
    "h100x8": ((1, 8, 1), "one host with 8 GPUs (80 GB each): FSDP over all of them"),
    "h100x64": ((8, 8, 1), "8 hosts x 8 GPUs: 8-way data parallel x 8-way FSDP"),
    "v5e-64": ((4, 16, 1), "TPU v5e-64 slice (16 GB per chip): 16-way FSDP x 4-way data parallel"),
    "v5e-256": ((8, 8, 4), "TPU v5e-256 (16 GB per chip): 64 batch shards x 4-way tensor parallel"),
}


def get_config(arg=None):
    mesh = arg or "fsdp8"
    if mesh not in MESHES:
        raise ValueError(f"unknown mesh {mesh!r} for tpad_llava7b.py; choose from {sorted(MESHES)}")
    # configs/ is a folder of scripts, not a package: run the base config by path.
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("tpad_base.py")))["get_config"]()
    c.preset = f"llava7b:{mesh}"

    c.data.source = "canonical"  # a real catalogue: --config.data.raw_dir=...
    c.data.image_size = 336
    c.data.max_item_tokens = 48  # title + category in Llama tokens
    c.data.max_title_tokens = 24
    c.data.item_visual_tokens = 64  # 8 x 8 pooled from the 24 x 24 patch grid
    c.data.visual_tokens_per_item = 4
    c.data.max_prompt_items = 5
    c.data.worker_count = 8
    c.data.read_threads = 8

    c.model.preset = "llava_1_5_7b"
    c.model.share_base = True  # two LoRA sets over one frozen base: two 7B towers cost one 7B
    c.model.full_finetune = False  # the base stays frozen: only LoRA, projectors and heads train
    c.model.base_param_dtype = "bfloat16"  # frozen: stored in bf16 (13.5 GB instead of 27 GB for 7B)
    c.model.train_projector = True
    c.model.checkpoint_dir = "checkpoints/llava-1.5-7b-hf"
    c.model.lora_rank = 16
    c.model.lora_alpha = 32.0
    c.model.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.model.embed_dim = 256
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True

    c.stage1.steps = 2000
    c.stage1.batch_size = 256  # item prompts per step (global)
    c.stage1.learning_rate = 2e-4
    c.stage1.warmup_steps = 100
    c.stage2.steps = 3000
    c.stage2.batch_size = 64  # sessions per step (global); each also runs K over its S + 1 items
    c.stage2.learning_rate = 2e-4
    c.stage2.knowledge_learning_rate = 1e-4
    c.stage2.warmup_steps = 100
    c.stage2.keep_batch_size = 32

    c.msbr.hidden_dim = 128
    c.eval.batch_size = 256
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.checkpoint_every = 250

    c.mesh.shape = MESHES[mesh][0]
    c.mesh.rules = "default"  # FSDP over `fsdp`, tensor parallelism over `tensor`
    return c
