"""Backbones: build a timm ViT by name, describe one so it can be rebuilt, load its weights from a file.

Weights come from local files only: a timm-format state dict (``.pth``/``.pt``/``.bin`` or
``.safetensors``; wrapped in ``{"model": ...}`` / ``{"state_dict": ...}`` is fine) or an original
Google ViT ``.npz`` (loaded with timm's own npz reader).  Position embeddings and patch embeddings of
another resolution are resampled by timm's ``checkpoint_filter_fn``.  The classifier of the file is
ignored: SA2VP trains its own head.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import timm
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["build_backbone", "describe_backbone", "load_backbone_weights", "backbone_name"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_TUPLE_KEYS = ("img_size", "patch_size")


def describe_backbone(vit: VisionTransformer) -> dict[str, Any]:
    """Constructor arguments that rebuild ``vit``'s structure (weights aside), JSON-serialisable.

    Passed to ``timm.create_model(name, **kwargs)`` they override the entrypoint's defaults, so a model
    built with non-default sizes is rebuilt with those sizes; the entrypoint keeps the rest (norm and
    activation layers).
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"backbone must be a timm VisionTransformer, got {type(vit).__name__}")
    pe = vit.patch_embed
    blk = vit.blocks[0]
    identity = lambda m: isinstance(m, nn.Identity)  # noqa: E731
    return dict(
        img_size=list(pe.img_size),
        patch_size=list(pe.patch_size),
        in_chans=int(pe.proj.in_channels),
        embed_dim=int(vit.embed_dim),
        depth=len(vit.blocks),
        num_heads=int(blk.attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not identity(blk.attn.q_norm),
        init_values=1e-5 if isinstance(blk.ls1, LayerScale) else None,
        class_token=bool(vit.has_class_token),
        reg_tokens=int(vit.num_reg_tokens),
        no_embed_class=bool(vit.no_embed_class),
        pos_embed="learn" if vit.pos_embed is not None else "none",
        pre_norm=not identity(vit.norm_pre),
        final_norm=not (identity(vit.norm) and identity(vit.fc_norm)),
        fc_norm=not identity(vit.fc_norm),
        global_pool=vit.global_pool,
        dynamic_img_size=bool(vit.dynamic_img_size),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        num_classes=0,
    )


def backbone_name(vit: nn.Module) -> str | None:
    """The timm model name (with its pretrained tag, if any) ``vit`` was created from, or None."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return None
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else arch


def build_backbone(name: str | None, kwargs: dict[str, Any] | None = None) -> VisionTransformer:
    """A timm ViT with random weights: ``timm.create_model(name, pretrained=False, **kwargs)``, or a
    plain ``VisionTransformer(**kwargs)`` when ``name`` is None."""
    kwargs = dict(kwargs or {})
    for key in _TUPLE_KEYS:
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if name is None:
        if not kwargs:
            raise ValueError("build_backbone needs a timm model name or the VisionTransformer arguments")
        model = VisionTransformer(**kwargs)
    else:
        if not isinstance(name, str):
            raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
        model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"timm model {name!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with arbitrary objects, truncated file, not a torch file
        raise ValueError(f"could not read {path} as a torch state dict ({exc})") from exc
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (a dict name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_backbone_weights(vit: VisionTransformer, path) -> None:
    """Load pretrained backbone weights from a local file into ``vit`` (in place).

    ``.npz``: original ViT / big_vision checkpoint (timm's npz loader).  ``.safetensors``, ``.pth``,
    ``.pt``, ``.bin``: a timm state dict.  Head weights in the file are ignored; every other backbone
    weight must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".npz":
        vit.load_pretrained(str(path))
        return
    if path.suffix != ".safetensors" and path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"unknown backbone weights format {path.suffix!r} for {path}; expected .npz, .safetensors or one "
            f"of {_TORCH_SUFFIXES}"
        )
    state = _read_state_dict(path)
    state = checkpoint_filter_fn(state, vit)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"backbone weights in {path} do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"backbone weights in {path} do not match the model: missing {_short(missing)}, "
            f"unexpected {_short(unexpected)}"
        )


def _short(keys, n=8) -> str:
    keys = list(keys)
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
