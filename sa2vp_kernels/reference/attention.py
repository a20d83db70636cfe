"""Pure-PyTorch references of the spatially aligned local cross attention.

* :func:`local_cross_attention_oracle` follows the definition query by query (slow, obviously right).
* :func:`local_cross_attention_vectorized` pads and unfolds the key/value grids like the authors'
  accelerated code, for both border modes and any odd window.  It is the baseline the kernels beat.

Both take ``q, k, v`` of shape ``(B, heads, N, head_dim)`` with ``N = num_prefix + gh * gw`` and
differentiate through plain autograd.  Arguments are assumed to be validated by the caller
(:func:`sa2vp_kernels.local_cross_attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _prefix_attention(q, k, v, num_prefix: int, scale: float):
    """Prefix (CLS) queries attend to all N keys."""
    qp = q[:, :, :num_prefix]
    s = torch.matmul(qp, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


def local_cross_attention_oracle(q, k, v, grid, window=3, num_prefix=1, border="clip", scale=None):
    """Definition-following reference: loops over every grid query and gathers its window."""
    gh, gw = grid
    T = num_prefix
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rad = window // 2
    outs = []
    if T > 0:
        outs.append(_prefix_attention(q, k, v, T, scale))
    zero_key = torch.zeros_like(k[:, :, 0])
    for y in range(gh):
        for x in range(gw):
            qi = q[:, :, T + y * gw + x]  # (B, H, D)
            keys, vals = [], []
            for dy in range(-rad, rad + 1):
                for dx in range(-rad, rad + 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < gh and 0 <= xx < gw:
                        j = T + yy * gw + xx
                        keys.append(k[:, :, j])
                        vals.append(v[:, :, j])
                    elif border == "zero":
                        keys.append(zero_key)
                        vals.append(zero_key)
            kk = torch.stack(keys, dim=2)  # (B, H, M, D)
            vv = torch.stack(vals, dim=2)
            s = (qi.unsqueeze(2) * kk).sum(-1) * scale  # (B, H, M)
            p = torch.softmax(s, dim=-1)
            outs.append((p.unsqueeze(-1) * vv).sum(2).unsqueeze(2))
    return torch.cat(outs, dim=2)


def _unfold_grid(t, T: int, gh: int, gw: int, window: int):
    """(B, H, N, D) -> (B*H, D, window*window, gh*gw): the zero-padded window of every grid position."""
    B, H, _, D = t.shape
    g = t[:, :, T:].reshape(B * H, gh, gw, D).permute(0, 3, 1, 2)
    rad = window // 2
    u = F.unfold(g, kernel_size=window, padding=rad)  # (BH, D*w*w, G)
    return u.view(B * H, D, window * window, gh * gw)


def _border_mask(gh: int, gw: int, window: int, device) -> torch.Tensor:
    """(window*window, gh*gw) bool: True where the neighbour lies inside the grid."""
    ones = torch.ones(1, 1, gh, gw, device=device)
    valid = F.unfold(ones, kernel_size=window, padding=window // 2)
    return valid.view(window * window, gh * gw) > 0.5


def local_cross_attention_vectorized(q, k, v, grid, window=3, num_prefix=1, border="clip", scale=None):
    """Vectorised reference (pad + unfold), the authors' accelerated approach for both border modes."""
    gh, gw = grid
    T = num_prefix
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    G = gh * gw
    ku = _unfold_grid(k, T, gh, gw, window)
    vu = _unfold_grid(v, T, gh, gw, window)
    qg = q[:, :, T:].reshape(B * H, G, D)
    s = torch.einsum("bgd,bdwg->bgw", qg, ku) * scale
    if border == "clip":
        valid = _border_mask(gh, gw, window, q.device).t()  # (G, w*w)
        s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    og = torch.einsum("bgw,bdwg->bgd", p, vu).reshape(B, H, G, D)
    if T == 0:
        return og
    return torch.cat([_prefix_attention(q, k, v, T, scale), og], dim=2)


def local_cross_attention_lse(q, k, grid, window=3, num_prefix=1, border="clip", scale=None):
    """Log-sum-exp of every query's scaled scores, (B, H, N): what the kernels save for backward."""
    gh, gw = grid
    T = num_prefix
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    ku = _unfold_grid(k, T, gh, gw, window)
    qg = q[:, :, T:].reshape(B * H, gh * gw, D)
    s = torch.einsum("bgd,bdwg->bgw", qg, ku) * scale
    if border == "clip":
        valid = _border_mask(gh, gw, window, q.device).t()
        s = s.masked_fill(~valid, float("-inf"))
    lse_g = torch.logsumexp(s, dim=-1).reshape(B, H, gh * gw)
    if T == 0:
        return lse_g
    sp = torch.matmul(q[:, :, :T], k.transpose(-1, -2)) * scale
    return torch.cat([torch.logsumexp(sp, dim=-1), lse_g], dim=2)
