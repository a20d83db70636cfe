"""SA2VP checkpoints: one safetensors file, the configuration in its metadata.

Tensors: the trainable parameters under their model names (``prompt.embed``, ``adapters.3.down.weight``,
``head.weight``, ...) and, optionally, the frozen backbone under ``backbone.*``.  Metadata (all strings):

* ``format`` = ``"sa2vp"``, ``format_version`` = ``"1"``
* ``config``: :class:`SA2VPConfig` as JSON; ``num_classes``
* ``backbone_name``: the timm model name ("" when the backbone was built without one)
* ``backbone_kwargs``: JSON constructor arguments that rebuild the backbone's structure
* ``includes_backbone``: ``"true"`` / ``"false"``

A checkpoint without the backbone needs the pretrained backbone at load time (``pretrained_path=`` or a
``backbone=`` instance that already holds its weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import SA2VPConfig
from .model import SA2VP
from .weights import build_backbone, describe_backbone

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sa2vp"
FORMAT_VERSION = "1"
_RESERVED = ("format", "format_version", "config", "num_classes", "backbone_name", "backbone_kwargs",
             "includes_backbone")


def save_checkpoint(model: SA2VP, path, *, include_backbone: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s trainable parameters (and with ``include_backbone`` its frozen backbone) to ``path``.

    ``metadata``: extra string entries stored alongside (names must not clash with the reserved ones).
    """
    from safetensors.torch import save_file

    if not isinstance(model, SA2VP):
        raise TypeError(f"model must be an SA2VP, got {type(model).__name__}")
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the checkpoint format")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError("metadata must map str to str")
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.trainable_state_dict().items()}
    if include_backbone:
        tensors.update({f"backbone.{n}": t.detach().cpu().contiguous() for n, t in model.backbone.state_dict().items()})
    meta = {
        **extra,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "num_classes": str(model.num_classes),
        "backbone_name": model.backbone_name or "",
        "backbone_kwargs": json.dumps(model.backbone_kwargs, sort_keys=True),
        "includes_backbone": "true" if include_backbone else "false",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path) -> dict[str, str]:
    """The metadata of an SA2VP checkpoint (checked to be one)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an SA2VP checkpoint (its metadata has no format={FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {meta.get('format_version')!r}; "
                         f"this code reads version {FORMAT_VERSION!r}")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise ValueError(f"{path}: checkpoint metadata lacks {missing}")
    return meta


def load_checkpoint(path, backbone=None, pretrained_path=None) -> SA2VP:
    """Rebuild the SA2VP model saved by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` checkpoint.
        backbone: optional timm ViT instance to use (its structure must match the saved one); needed, or
            ``pretrained_path``, when the checkpoint does not include the backbone.
        pretrained_path: backbone weights file, for checkpoints without the backbone.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    config = SA2VPConfig.from_json(meta["config"])
    num_classes = int(meta["num_classes"])
    name = meta["backbone_name"] or None
    kwargs = json.loads(meta["backbone_kwargs"])
    has_backbone = meta["includes_backbone"] == "true"
    if has_backbone and pretrained_path is not None:
        raise ValueError(f"{path} includes the backbone weights; pretrained_path={pretrained_path!r} would "
                         f"replace them (pass one or the other)")
    if not has_backbone and backbone is None and pretrained_path is None:
        raise ValueError(f"{path} holds only the trainable parameters; pass pretrained_path= (the backbone "
                         f"weights file) or backbone= (a pretrained timm ViT instance)")
    if backbone is None:
        backbone = build_backbone(name, kwargs)
    else:
        given = describe_backbone(backbone)
        diff = {k: (given.get(k), v) for k, v in kwargs.items() if given.get(k) != v}
        if diff:
            raise ValueError(f"backbone does not match the checkpoint's (given, saved): {diff}")
    model = SA2VP(backbone, num_classes, config, pretrained_path=pretrained_path)
    if name is not None:
        model.backbone_name = name
    tensors = load_file(str(path), device="cpu")
    if has_backbone:
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            model.backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"backbone weights in {path} do not fit the rebuilt backbone: {exc}") from exc
    model.load_trainable_state_dict({k: v for k, v in tensors.items() if not k.startswith("backbone.")})
    return model
