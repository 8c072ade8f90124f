"""A downstream row's settings: its effective config, its session encoder and its model factory."""

import dataclasses

from flax import nnx

from tpad_jax import rows
from tpad_jax.cli import UserError
from tpad_jax.downstream.features import normalise_content
from tpad_jax.models import session_encoders
from tpad_jax.train import optim

# Settings a row may set for itself in `msbr.per_model.<row>.<key>` (None: the row takes `msbr.<key>`).
ROW_SETTINGS = ("learning_rate", "hidden_dim", "dropout", "max_epochs", "patience", "lr_decay",
                "attention_dropout", "transformer_norm", "transformer_init_std", "content_norm")


def row_config(name: str, config):
    """`config` as the neural row `name` sees it: `msbr.per_model[name]`'s settings in place of `msbr.*`.

    The copy has no `per_model` section, so the row's provenance record holds its own effective
    settings: a per-row setting retrains that row and no other. A config without the section (or a
    copy this returned) is returned as it is.

    Raises:
      UserError for a per_model entry of an unknown row or a key outside `ROW_SETTINGS`.
    """
    rows.neural_row(name)
    neural = rows.names(rows.neural())
    per_model = config.msbr.get("per_model")
    if per_model is None:
        return _checked(name, config)
    problems = [f"unknown row {row!r}" for row in per_model if row not in neural]
    problems += [f"{row}.{key}: not a per-row setting" for row, settings in per_model.items()
                 for key in settings if key not in ROW_SETTINGS]
    if problems:
        raise UserError(f"msbr.per_model: {'; '.join(problems)}; rows: {', '.join(neural)}; "
                        f"settings: {', '.join(ROW_SETTINGS)}")
    resolved = config.copy_and_resolve_references()
    with resolved.unlocked():
        del resolved.msbr["per_model"]
        for key, value in per_model.get(name, {}).items():
            if value is not None:
                resolved.msbr[key] = value
    return _checked(name, resolved)


def _checked(name: str, config):
    """`config`, once its settings that no model constructor checks are within their choices."""
    if config.msbr.lr_decay not in optim.DECAYS:
        raise UserError(f"{name}: msbr.lr_decay must be one of {', '.join(optim.DECAYS)}, "
                        f"got {config.msbr.lr_decay!r}")
    every = config.msbr.checkpoint_every_epochs
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserError(f"msbr.checkpoint_every_epochs must be a whole number >= 1, got {every!r}")
    return config


def encoder_config(name: str, config) -> session_encoders.EncoderConfig:
    """The session encoder of the neural model `name` under its settings (`row_config`)."""
    config = row_config(name, config)  # its own UserError names the row already
    try:
        settings = session_encoders.EncoderConfig.from_config(config)
        return dataclasses.replace(settings, encoder=rows.neural_row(name).encoder)
    except ValueError as error:  # a setting outside its choices is the user's to fix
        raise UserError(f"{name}: {error}") from None


def check_rows(names, config) -> None:
    """Every neural row of `names` under its settings (`encoder_config`), so that a setting outside
    its choices stops a run at start-up, not after the towers have trained.

    Raises:
      UserError naming the row and the setting.
    """
    neural = set(rows.names(rows.neural()))
    for name in names:
        if name in neural:
            encoder_config(name, config)


def model_factory(name: str, config, num_items: int, features, item_counts=None):
    """A deterministic `make_model()` for the neural model `name` over exported `features` (or None).

    The item vectors read the features normalised per `msbr.content_norm`; the last-item similarity
    term reads their unit rows, so that it is the cosine the retrieval probe ranks by. `item_counts`
    (train clicks per item) shrink the ID embeddings under `msbr.id_shrinkage`.
    """
    config = row_config(name, config)
    cfg = encoder_config(name, config)
    content = similarity = None
    if features is not None:
        content = normalise_content(features, config.msbr.content_norm)
        if cfg.last_item_similarity:
            similarity = normalise_content(features, "l2")
    return lambda: session_encoders.SessionEncoder(cfg, num_items, content, similarity, item_counts,
                                                   rngs=nnx.Rngs(config.seed))
