"""sa2vp-kernels: fused kernels for SA2VP (spatially aligned-and-adapted visual prompts).

Public ops (each with ``backend="auto" | "triton" | "cuda" | "cpu" | "reference"``):

* :func:`local_cross_attention` - spatially aligned cross-pathway attention.
* :func:`prompt_map` - prompt tokens from a (resampled) low-rank prompt map.
* :func:`prompt_add` - fused LayerNorm / low-rank adapter / dropout / residual add of a message.
"""
from . import reference
from ._dispatch import BACKENDS
from ._ext import cpu_isa, cpu_threads, extension_available
from .local_attention import LocalCrossAttention, local_cross_attention
from .prompt_add import prompt_add
from .prompt_map import prompt_map

__all__ = [
    "BACKENDS",
    "LocalCrossAttention",
    "cpu_isa",
    "cpu_threads",
    "extension_available",
    "local_cross_attention",
    "prompt_add",
    "prompt_map",
    "reference",
]
__version__ = "0.1.0"
