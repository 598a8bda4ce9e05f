"""``mstc train``'s trainer and ``mstc report``'s plots. Importing this package does not import torch."""
from __future__ import annotations

from .options import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module 'mst_compile.train' has no attribute {name!r}")
