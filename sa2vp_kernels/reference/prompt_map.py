"""Pure-PyTorch reference of the prompt map op.

``prompt_map_reference`` builds the prompt token map of SA2VP: the learned low-rank prompt map, laid
out on its own ``embed_grid``, is resampled bilinearly to the token grid (``F.interpolate`` with
``align_corners=False``), projected with ``F.linear`` and shifted by the positional embedding.  Prefix
rows (CLS, registers) are not resampled.  It differentiates through plain autograd.  Arguments are
assumed to be validated by the caller (:func:`sa2vp_kernels.prompt_map`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_prompt_rows(embed: torch.Tensor, grid, embed_grid, num_prefix: int) -> torch.Tensor:
    """``(num_prefix + h*w, r)`` rows on ``embed_grid`` -> ``(num_prefix + H*W, r)`` rows on ``grid``."""
    (gh, gw), (eh, ew) = grid, embed_grid
    if (eh, ew) == (gh, gw):
        return embed
    r = embed.shape[1]
    prefix, rows = embed[:num_prefix], embed[num_prefix:]
    image = rows.t().reshape(1, r, eh, ew)
    image = F.interpolate(image, size=(gh, gw), mode="bilinear", align_corners=False)
    return torch.cat([prefix, image.reshape(r, gh * gw).t()], dim=0)


def prompt_map_reference(embed, weight, bias, pos_embed, grid, *, num_prefix=1, embed_grid=None):
    """``resample(embed) @ weight.T + bias + pos_embed`` as a ``(1, num_prefix + H*W, C)`` tensor.

    Args:
        embed: ``(num_prefix + h*w, r)`` prompt rows on the ``embed_grid = (h, w)`` layout.
        weight: ``(C, r)`` projection; bias: ``(C,)`` or None.
        pos_embed: ``(1, num_prefix + H*W, C)`` or None.
        grid: token grid ``(H, W)``; embed_grid: ``(h, w)``, default ``grid``.
    """
    embed_grid = tuple(grid) if embed_grid is None else tuple(embed_grid)
    rows = resample_prompt_rows(embed, tuple(grid), embed_grid, num_prefix)
    out = F.linear(rows, weight, bias).unsqueeze(0)
    if pos_embed is not None:
        out = out + pos_embed
    return out
