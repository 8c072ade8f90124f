"""Downstream session encoders (transformer, SR-GNN, GRU4Rec) and chunked full-softmax cross-entropy.

Inputs: `items int32 [B, S]` item rows and `mask bool [B, S]` valid clicks, **right-padded**: the
clicks of a session fill positions 0..len-1 (left-aligned, as in the session batches of the pipeline)
and padding follows with row 0 and mask False. Positions count from the session start, so appending
padding never changes a session vector.

Item vectors: x_v = a_v E_id[v] + W e_content[v] (training may drop E_id[v] of whole items: `id_dropout`).
a_v = 1 unless `id_shrinkage` = k > 0, then a_v = n_v / (n_v + k) with n_v the item's train clicks: an
ID seen a few times is a noisy estimate, so it counts in proportion to its evidence and the content
carries the rest (a rarely clicked item is scored mostly by its content). `id_embedding=False` drops
E_id from content rows altogether: items are their content alone (a content item tower). `item_bias`
adds a learned scalar b_v to the score of v (popularity, which content cannot tell), written as one
more column: session vectors [h ; 1], item vectors [x_v ; b_v].
This is the concatenation [E_id[v] ; W e_content[v]] seen through the fixed projection [I I]: the
encoder inputs and the scoring table share one width, and an item whose ID embedding never trained (a
cold item) still scores through its content. `content` is frozen (a `FrozenFeatures` variable, not a
`Param`); `None` gives the ID-only model. Scores are `session_vec @ item_table().T`.

Last-item similarity (`similarity`, content models): the score of v gains g * cos(e[last], e[v]), the
cosine of the raw exported features of the session's last click and of v, with a learned weight g. The
item vectors above see content only through a learned projection of whitened features, which IDs
dominate for warm items; the similarity of the export itself is what stage 2 trains (next items near the
current one in e_K space) and the one signal a cold item has. It is written as two more columns, so
every scorer stays a dot product: session vectors [h ; g * u_last], item vectors [x_v ; u_v] (u: unit
rows of the export).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpad_jax.models.mi import masked_mean

ENCODERS = ("transformer", "srgnn", "gru4rec")
CONTENT_PROJECTIONS = ("linear", "mlp")
# Transformer block layouts: "pre" normalises each sublayer's input and the final states (GPT-2); "post"
# normalises the embedded inputs and each residual sum, with no final norm (SASRec, Kang & McAuley 2018,
# as RecBole builds it).
TRANSFORMER_NORMS = ("pre", "post")


class FrozenFeatures(nnx.Variable):
    """Constant content features: state (checkpointed), never selected by an `nnx.Param` optimizer."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of a session encoder; `from_config` reads `config.msbr` and the data's max length."""

    encoder: str = "transformer"
    causal: bool = True
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.0  # transformer: dropout on the attention probabilities
    transformer_norm: str = "pre"  # pre | post (TRANSFORMER_NORMS)
    # Std of the normal init of the transformer's dense kernels; 0: flax's LeCun normal (1/sqrt(fan_in)).
    # SASRec (RecBole) and BERT draw every weight from N(0, 0.02).
    transformer_init_std: float = 0.0
    id_dropout: float = 0.0
    gnn_steps: int = 1
    max_length: int = 20
    content_projection: str = "linear"  # linear | mlp: how content features become item-vector space
    last_item_similarity: bool = False  # content models: score += g * cos(e[last], e[v]) (module docstring)
    id_embedding: bool = True  # content models: False scores items by their content alone
    id_shrinkage: float = 0.0  # content models: k of a_v = n_v / (n_v + k) (module docstring); 0: a_v = 1
    item_bias: bool = False  # a learned score bias per item (module docstring)

    @classmethod
    def from_config(cls, config):
        """Builds the encoder config from the full run config (`config.msbr`, `config.data`)."""
        msbr = config.msbr
        return cls(
            encoder=msbr.encoder,
            causal=msbr.causal,
            hidden_dim=msbr.hidden_dim,
            num_layers=msbr.num_layers,
            num_heads=msbr.num_heads,
            dropout=msbr.dropout,
            attention_dropout=msbr.attention_dropout,
            transformer_norm=msbr.transformer_norm,
            transformer_init_std=msbr.transformer_init_std,
            id_dropout=msbr.id_dropout,
            gnn_steps=msbr.gnn_steps,
            max_length=config.data.max_session_length,
            content_projection=msbr.content_projection,
            last_item_similarity=msbr.last_item_similarity,
            id_embedding=msbr.id_embedding,
            id_shrinkage=msbr.id_shrinkage,
            item_bias=msbr.item_bias,
        )

    @property
    def reads_every_position(self) -> bool:
        """Whether the body is causal: its state at position j sees clicks 0..j only."""
        return self.encoder == "gru4rec" or (self.encoder == "transformer" and self.causal)

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"msbr.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.content_projection not in CONTENT_PROJECTIONS:
            raise ValueError(f"msbr.content_projection must be one of {CONTENT_PROJECTIONS}, "
                             f"got {self.content_projection!r}")
        if self.transformer_norm not in TRANSFORMER_NORMS:
            raise ValueError(f"msbr.transformer_norm must be one of {TRANSFORMER_NORMS}, "
                             f"got {self.transformer_norm!r}")
        if self.id_shrinkage < 0:
            raise ValueError(f"msbr.id_shrinkage must be >= 0, got {self.id_shrinkage}")


class SessionEncoder(nnx.Module):
    """Item inputs + one encoder body; `__call__` gives session vectors, `item_table` the item vectors."""

    def __init__(self, cfg: EncoderConfig, num_items: int, content=None, similarity=None, item_counts=None,
                 *, rngs: nnx.Rngs):
        """Args:
          content: frozen content features [N, d_c] the item vectors project (None: ID only).
          similarity: unit rows [N, d_s] whose cosine to the last click is a score term; used when
            `cfg.last_item_similarity` and content is given.
          item_counts: train clicks [N] per item; needed when `cfg.id_shrinkage` > 0 and content is given.
        """
        self.cfg = cfg
        dim = cfg.hidden_dim
        # The same draw whether or not a content row uses it, so the other parameters start alike.
        id_embedding = nnx.Embed(num_items, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.id_embedding = id_embedding if content is None or cfg.id_embedding else None
        id_scale = None
        if content is not None and cfg.id_embedding and cfg.id_shrinkage > 0:
            if item_counts is None or len(item_counts) != num_items:
                raise ValueError(f"id_shrinkage needs train click counts for {num_items} items")
            counts = np.asarray(item_counts, np.float64)
            id_scale = FrozenFeatures(jnp.asarray(counts / (counts + cfg.id_shrinkage), jnp.float32)[:, None])
        self.id_scale = id_scale
        self.item_bias = nnx.Param(jnp.zeros((num_items, 1), jnp.float32)) if cfg.item_bias else None
        if content is None:
            self.content = None
            self.content_projection = None
        else:
            content = jnp.asarray(content, jnp.float32)
            if content.shape[0] != num_items:
                raise ValueError(f"content has {content.shape[0]} rows for {num_items} items")
            self.content = FrozenFeatures(content)
            if cfg.content_projection == "linear":
                self.content_projection = nnx.Linear(content.shape[1], dim, use_bias=False, rngs=rngs)
            else:  # a hidden layer lets attribute combinations, not only their sum, place an item
                self.content_projection = nnx.Sequential(
                    nnx.Linear(content.shape[1], 2 * dim, rngs=rngs), nnx.gelu,
                    nnx.Linear(2 * dim, dim, use_bias=False, rngs=rngs))
        self.input_dropout = nnx.Dropout(cfg.dropout, deterministic=False, rngs=rngs)
        # Whole rows of the ID table, i.e. items, are dropped (DropoutNet, Volkovs et al. 2017): an item
        # then counts by its content alone, as a cold item does at test time. Content models only.
        self.id_dropout = nnx.Dropout(cfg.id_dropout if content is not None else 0.0, broadcast_dims=(1,),
                                      deterministic=False, rngs=rngs)
        body = {"transformer": TransformerBody, "srgnn": SRGNNBody, "gru4rec": GRUBody}[cfg.encoder]
        self.body = body(cfg, rngs=rngs)
        if cfg.last_item_similarity and content is not None:
            if similarity is None or similarity.shape[0] != num_items:
                raise ValueError(f"last_item_similarity needs similarity rows for {num_items} items")
            self.similarity = FrozenFeatures(jnp.asarray(similarity, jnp.float32))
            # Starts where a cosine already moves the ranking next to logits of a few units.
            self.similarity_weight = nnx.Param(jnp.asarray(4.0, jnp.float32))
        else:
            self.similarity = None

    def item_vectors(self):
        """Item input vectors [N, d] = (shrunk) ID embedding + projected content (module docstring)."""
        if self.content is None:
            return self.id_embedding.embedding[...]
        table = self.content_projection(self.content[...])
        if self.id_embedding is None:
            return table
        ids = self.id_dropout(self.id_embedding.embedding[...])
        return table + (ids if self.id_scale is None else self.id_scale[...] * ids)

    def item_table(self):
        """Item scoring vectors: the input vectors, then the unit similarity rows and the bias when used."""
        columns = [self.item_vectors()]
        if self.similarity is not None:
            columns.append(self.similarity[...])
        if self.item_bias is not None:
            columns.append(self.item_bias[...])
        return columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)

    def _with_similarity(self, vectors, last_items):
        """Session vectors with g * u[last click] and the bias's 1 appended when used (module docstring)."""
        columns = [vectors]
        if self.similarity is not None:
            columns.append(self.similarity_weight[...] * self.similarity[...][last_items])
        if self.item_bias is not None:
            columns.append(jnp.ones(vectors.shape[:-1] + (1,), vectors.dtype))
        return columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)

    def __call__(self, items, mask):
        """Session vectors [B, d] for right-padded `items` [B, S] with valid-click `mask` [B, S]."""
        if items.shape[1] > self.cfg.max_length:
            raise ValueError(f"sessions of length {items.shape[1]} exceed max_length {self.cfg.max_length}")
        inputs = self.input_dropout(self.item_vectors()[items])
        last = jnp.take_along_axis(items, last_valid_index(mask)[:, None], axis=1)[:, 0]
        return self._with_similarity(self.body(inputs, items, mask), last)

    def scores(self, items, mask):
        """Scores [B, N] of every item as the next click."""
        return self(items, mask) @ self.item_table().T

    def position_vectors(self, items, mask):
        """Session vectors [B, S, d] of every prefix at once: position j is `self(items[:, :j + 1])`.

        One pass per session instead of one per prefix (the SASRec / GRU4Rec training trick); only
        causal bodies have it, since a bidirectional or graph body lets position j see later clicks.
        """
        if not self.cfg.reads_every_position:
            raise ValueError(f"position_vectors needs a causal encoder; {self.cfg.encoder!r} "
                             f"(causal={self.cfg.causal}) reads whole sessions")
        if items.shape[1] > self.cfg.max_length:
            raise ValueError(f"sessions of length {items.shape[1]} exceed max_length {self.cfg.max_length}")
        inputs = self.input_dropout(self.item_vectors()[items])
        # Position j's last click is items[:, j].
        return self._with_similarity(self.body.hidden_states(inputs, mask), items)


def last_valid_index(mask):
    """Index [B] of the last valid position of right-padded sessions (0 for empty ones)."""
    return jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)


class TransformerBody(nnx.Module):
    """Transformer with learned positions (`cfg.transformer_norm` places the norms); reads out the last
    valid position."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        dim = cfg.hidden_dim
        self.causal = cfg.causal
        self.positions = nnx.Embed(
            cfg.max_length, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
        )
        self.blocks = nnx.List([_TransformerBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        # Pre: the last block's residual stream is normalised once at the end. Post: the embedded inputs
        # are, and every block ends in a norm.
        norm = nnx.LayerNorm(dim, rngs=rngs)
        self.final_norm, self.input_norm = (norm, None) if cfg.transformer_norm == "pre" else (None, norm)

    def __call__(self, inputs, items, mask):
        hidden = self.hidden_states(inputs, mask)
        return jnp.take_along_axis(hidden, last_valid_index(mask)[:, None, None], axis=1)[:, 0]

    def hidden_states(self, inputs, mask):
        """Final-layer states [B, S, d] at every position."""
        length = inputs.shape[1]
        hidden = inputs + self.positions.embedding[...][:length]
        if self.input_norm is not None:
            hidden = self.input_norm(hidden)
        # Padded keys are never attended; padded queries produce outputs that nothing reads.
        attention_mask = jnp.broadcast_to(mask[:, None, None, :], (mask.shape[0], 1, length, length))
        if self.causal:
            attention_mask = attention_mask & jnp.tril(jnp.ones((length, length), bool))
        for block in self.blocks:
            hidden = block(hidden, attention_mask)
        return hidden if self.final_norm is None else self.final_norm(hidden)


class _TransformerBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        dim = cfg.hidden_dim
        self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.pre_norm = cfg.transformer_norm == "pre"
        init = {} if not cfg.transformer_init_std else \
            {"kernel_init": nnx.initializers.normal(cfg.transformer_init_std)}
        # Without attention dropout the layer stays deterministic and holds no random stream, so its
        # state is what it was before the option existed.
        self.attention = nnx.MultiHeadAttention(
            cfg.num_heads, dim, decode=False, dropout_rate=cfg.attention_dropout,
            deterministic=not cfg.attention_dropout, rngs=rngs, **init
        )
        self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs, **init)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs, **init)
        self.dropout = nnx.Dropout(cfg.dropout, deterministic=False, rngs=rngs)

    def __call__(self, hidden, attention_mask):
        if self.pre_norm:  # x + f(norm(x))
            hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), mask=attention_mask))
            return hidden + self.dropout(self._mlp(self.mlp_norm(hidden)))
        # norm(x + f(x))
        hidden = self.attention_norm(hidden + self.dropout(self.attention(hidden, mask=attention_mask)))
        return self.mlp_norm(hidden + self.dropout(self._mlp(hidden)))

    def _mlp(self, hidden):
        return self.mlp_out(jax.nn.gelu(self.mlp_in(hidden)))


def srgnn_graph(items, mask):
    """The SR-GNN session graph of one right-padded session, built with array ops only.

    Nodes are identified by the position of an item's first valid occurrence; `alias[i]` is the node
    of position i. A[u, v] = 1 if some consecutive valid clicks go u -> v (repeated transitions count
    once, as in the reference code). Normalisation follows Wu et al. 2019: node i aggregates
    predecessors through A_in[i, j] = A[j, i] / indeg(i) and successors through
    A_out[i, j] = A[i, j] / outdeg(i) (rows of isolated nodes stay zero).

    Args:
      items: int32 [S]; mask: bool [S] (valid prefix).

    Returns:
      (alias int32 [S], A_in float32 [S, S], A_out float32 [S, S]).
    """
    length = items.shape[0]
    same_item = (items[:, None] == items[None, :]) & mask[:, None] & mask[None, :]
    alias = jnp.argmax(same_item, axis=1).astype(jnp.int32)
    is_transition = (mask[:-1] & mask[1:]).astype(jnp.float32)
    source = jax.nn.one_hot(alias[:-1], length) * is_transition[:, None]
    target = jax.nn.one_hot(alias[1:], length)
    adjacency = (source.T @ target > 0).astype(jnp.float32)
    in_degree = jnp.sum(adjacency, axis=0)
    out_degree = jnp.sum(adjacency, axis=1)
    a_in = adjacency.T / jnp.maximum(in_degree, 1.0)[:, None]
    a_out = adjacency / jnp.maximum(out_degree, 1.0)[:, None]
    return alias, a_in, a_out


class SRGNNBody(nnx.Module):
    """SR-GNN (Wu et al. 2019): gated GNN over the session graph + soft-attention readout."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        dim = cfg.hidden_dim
        self.steps = cfg.gnn_steps
        self.edge_in = nnx.Linear(dim, dim, rngs=rngs)
        self.edge_out = nnx.Linear(dim, dim, rngs=rngs)
        self.bias_in = nnx.Param(jnp.zeros((dim,)))
        self.bias_out = nnx.Param(jnp.zeros((dim,)))
        self.gate_input = nnx.Linear(2 * dim, 3 * dim, rngs=rngs)
        self.gate_hidden = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.attention_last = nnx.Linear(dim, dim, rngs=rngs)
        self.attention_all = nnx.Linear(dim, dim, rngs=rngs)
        self.attention_score = nnx.Linear(dim, 1, use_bias=False, rngs=rngs)
        self.transform = nnx.Linear(2 * dim, dim, rngs=rngs)

    def _gated_step(self, a_in, a_out, hidden):
        incoming = a_in @ self.edge_in(hidden) + self.bias_in[...]
        outgoing = a_out @ self.edge_out(hidden) + self.bias_out[...]
        input_reset, input_update, input_new = jnp.split(
            self.gate_input(jnp.concatenate([incoming, outgoing], axis=-1)), 3, axis=-1
        )
        hidden_reset, hidden_update, hidden_new = jnp.split(self.gate_hidden(hidden), 3, axis=-1)
        reset = jax.nn.sigmoid(input_reset + hidden_reset)
        update = jax.nn.sigmoid(input_update + hidden_update)
        candidate = jnp.tanh(input_new + reset * hidden_new)
        return candidate + update * (hidden - candidate)

    def __call__(self, inputs, items, mask):
        alias, a_in, a_out = jax.vmap(srgnn_graph)(items, mask)
        # Node j starts from the item at position j; positions that are not nodes are never read.
        hidden = inputs
        for _ in range(self.steps):
            hidden = self._gated_step(a_in, a_out, hidden)
        per_position = jnp.take_along_axis(hidden, alias[:, :, None], axis=1)
        last = jnp.take_along_axis(per_position, last_valid_index(mask)[:, None, None], axis=1)[:, 0]
        weights = self.attention_score(
            jax.nn.sigmoid(self.attention_last(last)[:, None, :] + self.attention_all(per_position))
        )
        global_preference = jnp.sum(weights * per_position * mask[:, :, None], axis=1)
        return self.transform(jnp.concatenate([last, global_preference], axis=-1))


class GRUBody(nnx.Module):
    """GRU4Rec: a GRU over the clicks; the session vector is the hidden state after the last click."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cell = nnx.GRUCell(cfg.hidden_dim, cfg.hidden_dim, rngs=rngs)

    def __call__(self, inputs, items, mask):
        return self._scan(inputs, mask)[0]

    def hidden_states(self, inputs, mask):
        """The state after each click [B, S, d] (padding positions repeat the last state)."""
        return jnp.swapaxes(self._scan(inputs, mask)[1], 0, 1)

    def _scan(self, inputs, mask):
        def step(carry, inputs_and_mask):
            x, valid = inputs_and_mask
            new_carry, _ = self.cell(carry, x)
            # Padding steps keep the carry, so the final carry is the state after the last click.
            carry = jnp.where(valid[:, None], new_carry, carry)
            return carry, carry

        initial = jnp.zeros((inputs.shape[0], self.cell.hidden_features), inputs.dtype)
        return jax.lax.scan(step, initial, (jnp.swapaxes(inputs, 0, 1), jnp.swapaxes(mask, 0, 1)))


def chunked_softmax_cross_entropy(session_vecs, item_table, targets, chunk, *, mask=None):
    """Mean full-softmax cross-entropy over all items, in blocks of at most `chunk` items.

    A catalogue of up to `chunk` items is one [B, N] block. A larger one is scanned in chunks with a
    running logsumexp; the scan body is rematerialised, so the backward pass also holds one [B, chunk]
    block at a time.

    Args:
      session_vecs: [B, d]; item_table: [N, d]; targets: int32 [B] item rows.
      chunk: items per chunk (the table is padded up to a multiple of it).
      mask: optional bool [B] of valid rows; invalid rows do not count.

    Returns:
      Scalar mean cross-entropy over valid rows.
    """
    num_items, dim = item_table.shape
    batch = session_vecs.shape[0]
    valid_rows = jnp.ones((batch,), bool) if mask is None else mask.astype(bool)
    target_logits = jnp.sum(session_vecs * item_table[targets], axis=1)
    if num_items <= chunk:
        # One block: the plain logsumexp. A scan of one rematerialised chunk computes the same value but
        # runs its forward matmul twice (about 2x the loss's time at the default run's shapes).
        log_partition = jax.nn.logsumexp(session_vecs @ item_table.T, axis=1)
        return masked_mean(log_partition - target_logits, valid_rows)
    num_chunks = -(-num_items // chunk)
    padded = jnp.pad(item_table, ((0, num_chunks * chunk - num_items), (0, 0)))
    chunks = padded.reshape(num_chunks, chunk, dim)
    real_item = (np.arange(num_chunks * chunk) < num_items).reshape(num_chunks, chunk)

    @jax.checkpoint
    def accumulate(carry, chunk_and_valid):
        running_max, running_sum = carry
        table_chunk, valid = chunk_and_valid
        logits = jnp.where(valid[None, :], session_vecs @ table_chunk.T, -jnp.inf)
        # The shift only keeps exp() finite; the logsumexp value and gradient do not depend on it.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=1)))
        new_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=1
        )
        return (new_max, new_sum), None

    initial = (jnp.full((batch,), -jnp.inf, session_vecs.dtype), jnp.zeros((batch,), session_vecs.dtype))
    (running_max, running_sum), _ = jax.lax.scan(accumulate, initial, (chunks, jnp.asarray(real_item)))
    log_partition = running_max + jnp.log(running_sum)
    return masked_mean(log_partition - target_logits, valid_rows)
