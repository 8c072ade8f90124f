"""tpad_jax: TPAD (transitional patterns distilled into multimodal LLMs) for session recommendation."""

__version__ = "0.1.0"
