"""Pure-PyTorch reference of ``prompt_add`` and the dropout masks shared by every backend.

``prompt_add`` computes, for every token,

    out = target + scale * dropout(up(dropout(gelu(down(layer_norm(message)))))) [+ deep_scale * deep]

The two dropout masks are not drawn from a stateful generator: they are a pure function of
``(seed, stream, row, column)``, a counter-based hash built from 32-bit integer mixing that every
backend (this file, the C++ and CUDA kernels in ``csrc/prompt_add.h``, the Triton kernels) implements
identically.  The same seed therefore gives the same masks on every backend, and the backward
regenerates the forward's masks instead of storing them.

The hash, all arithmetic modulo 2**32:

    fmix32(x)       = murmur3's finaliser (xorshift 16, * 0x85EBCA6B, xorshift 13, * 0xC2B2AE35, xorshift 16)
    key(seed, s)    = fmix32(fmix32(seed_hi ^ (s * 0x9E3779B9)) ^ seed_lo)     (seed_lo/hi: 32-bit halves)
    row_state(k, m) = fmix32(fmix32(m) ^ k)
    u(k, m, c)      = fmix32(row_state(k, m) ^ (c * 0x9E3779B9))
    keep            = (u >> 1) >= threshold(p),   threshold(p) = min(floor(p * 2**31 + 1/2), 2**31 - 1)

Stream 1 is the hidden (tokens x r) mask, stream 2 the output (tokens x C) mask; rows are the flat
token index ``b * N + n``.  Kept elements are scaled by ``1 / (1 - p)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
HIDDEN_STREAM = 1
OUTPUT_STREAM = 2
MAX_SEED = 2**63


def fmix32(x: int) -> int:
    """murmur3's 32-bit finaliser on a Python int in ``[0, 2**32)``."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK32
    x ^= x >> 16
    return x


def stream_key(seed: int, stream: int) -> int:
    """32-bit key of one dropout stream for ``seed`` in ``[0, 2**63)``."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return fmix32(fmix32(hi ^ ((stream * GOLDEN) & MASK32)) ^ lo)


def drop_threshold(p: float) -> int:
    """Integer threshold on the 31-bit hash: an element is dropped when ``(u >> 1) < threshold``."""
    return min(math.floor(p * 2.0**31 + 0.5), 2**31 - 1)


def _mul32(x: torch.Tensor, k: int) -> torch.Tensor:
    # (x * k) mod 2**32 for int64 tensors holding values in [0, 2**32), without int64 overflow.
    lo = (x & 0xFFFF) * k
    hi = (((x >> 16) * k) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_hash(rows: int, cols: int, seed: int, stream: int, device=None) -> torch.Tensor:
    """The 32-bit hash ``u`` of every element of a ``(rows, cols)`` mask, as an int64 tensor."""
    key = stream_key(seed, stream)
    m = torch.arange(rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    row_state = _fmix32_tensor(_fmix32_tensor(m) ^ key)
    col_term = _mul32(c, GOLDEN)
    return _fmix32_tensor(row_state[:, None] ^ col_term[None, :])


def dropout_keep_mask(rows: int, cols: int, seed: int, stream: int, p: float, device=None) -> torch.Tensor:
    """Boolean ``(rows, cols)`` keep mask of one dropout stream (all True when ``p == 0``)."""
    if p == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    return (dropout_hash(rows, cols, seed, stream, device) >> 1) >= drop_threshold(p)


def hash_dropout(x: torch.Tensor, seed: int, stream: int, p: float) -> torch.Tensor:
    """Dropout of ``x`` (..., cols) with the hash mask; rows are the flattened leading dims."""
    if p == 0:
        return x
    cols = x.shape[-1]
    rows = x.numel() // cols
    keep = dropout_keep_mask(rows, cols, seed, stream, p, x.device).reshape(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def prompt_add_reference(target, message, scale, norm_weight, norm_bias, down_weight, down_bias, up_weight,
                         up_bias, deep=None, deep_scale=None, dropout_p=0.0, eps=1e-6, seed=None):
    """Unfused composition of ``prompt_add`` from PyTorch ops (differentiable by autograd).

    ``seed`` (an int in ``[0, 2**63)``) is required when ``dropout_p > 0``.
    """
    if dropout_p > 0 and seed is None:
        raise ValueError("prompt_add_reference needs an int seed when dropout_p > 0")
    C = message.shape[-1]
    y = F.layer_norm(message, (C,), norm_weight, norm_bias, eps)
    h = F.gelu(F.linear(y, down_weight, down_bias))
    h = hash_dropout(h, seed, HIDDEN_STREAM, dropout_p)
    u = hash_dropout(F.linear(h, up_weight, up_bias), seed, OUTPUT_STREAM, dropout_p)
    out = target + scale * u
    if deep is not None:
        out = out + deep_scale * deep
    return out
