"""tpad_jax: TPAD (transitional patterns distilled into multimodal LLMs) for session recommendation."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import tpad_jax` stays light: the recommender imports JAX and Flax.
    if name == "Recommender":
        from tpad_jax.recommender import Recommender  # noqa: PLC0415

        return Recommender
    raise AttributeError(f"module 'tpad_jax' has no attribute {name!r}")
