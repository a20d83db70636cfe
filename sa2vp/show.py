"""``sa2vp show``: where the prompt pathway steers the image.

At a P2B block every image token receives the message ``s * F`` from the prompt tokens of its 3 x 3
neighbourhood.  The norm of that message per token (``model.p2b_messages``) says how strongly the
prompt map acts on each region; it is upsampled to the image and blended over it as a heat map.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["message_map", "overlay", "write_overlay", "first_p2b_layer"]


def first_p2b_layer(model) -> int:
    """Index of the first P2B block (for Swin: counted over the blocks of all stages)."""
    if hasattr(model, "block_ids"):
        p2b = [model.block_ids.index(b) for b in model.p2b_blocks]
    else:
        p2b = [i for i in range(len(model.backbone.blocks)) if i not in model.b2p_layers]
    if not p2b:
        raise ValueError("the model has no P2B block (every block is B2P), so no prompt-to-image message exists")
    return p2b[0]


def preprocess(image: Image.Image, size: tuple[int, int], mean, std) -> torch.Tensor:
    """Resize to the model's input size (bicubic, like the VTAB recipe) and normalise: ``(1, 3, H, W)``."""
    resized = image.resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x.unsqueeze(0)


@torch.no_grad()
def message_map(model, x: torch.Tensor, layer: int) -> torch.Tensor:
    """``(H, W)`` message norm per token at P2B block ``layer`` for one image ``x`` of shape (1, 3, h, w)."""
    model.eval()
    return model.p2b_messages(x, layer)[0].float().cpu()


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """Blend ``heat`` (any grid, scaled to [0, 1] by its own range) over ``image`` at the image's size."""
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    try:
        colour = colormaps[cmap]
    except KeyError:
        raise ValueError(f"--cmap: unknown matplotlib colour map {cmap!r}") from None
    w, h = image.size
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)
    up = F.interpolate(norm[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    rgb = (colour(up.numpy())[..., :3] * 255.0).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * rgb
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def write_overlay(model, image_path: str, output: str, layer: int | None = None, run: dict | None = None,
                  alpha: float = 0.55, cmap: str = "inferno", device: str = "auto") -> dict:
    from .data import load_image

    image = load_image(image_path)
    if layer is None:
        layer = first_p2b_layer(model)
    data = (run or {}).get("data", {})
    mean, std = data.get("mean", (0.5,) * 3), data.get("std", (0.5,) * 3)
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    if device == "cuda" and dev.type != "cuda":
        raise RuntimeError("--device cuda: no CUDA device is available")
    model = model.to(dev).eval()
    size = tuple(model.backbone.patch_embed.img_size)
    x = preprocess(image, size, mean, std).to(dev)
    heat = message_map(model, x, layer)
    with torch.no_grad():
        pred = int(model(x).logits.argmax(-1)[0])
    overlay(image, heat, alpha, cmap).save(output, format="PNG")
    names = data.get("class_names")
    if names and pred < len(names):
        pred = f"{pred} ({names[pred]})"
    return {"layer": layer, "min": float(heat.min()), "max": float(heat.max()), "pred": pred,
            "grid": tuple(heat.shape)}
