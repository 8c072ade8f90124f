"""tpad_jax: TPAD (transitional-pattern distillation into multimodal LLMs) for session-based recommendation."""

__version__ = "0.1.0"
