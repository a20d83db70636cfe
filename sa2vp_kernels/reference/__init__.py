"""Pure-PyTorch oracles of every op (correctness references and benchmark baselines)."""
from .attention import (
    local_cross_attention_lse,
    local_cross_attention_oracle,
    local_cross_attention_vectorized,
)
from .prompt_add import prompt_add_reference
from .prompt_map import prompt_map_reference

__all__ = [
    "prompt_add_reference",
    "prompt_map_reference",
    "local_cross_attention_oracle",
    "local_cross_attention_vectorized",
    "local_cross_attention_lse",
]
