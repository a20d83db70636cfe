"""SA2VP checkpoints: one safetensors file, the configuration in its metadata.

Tensors: the trainable parameters under their model names (``prompt.embed``, ``adapters.3.down.weight``,
``head.weight``, ...) and, optionally, the frozen backbone under ``backbone.*``.  Metadata (all strings):

* ``format`` = ``"sa2vp"``, ``format_version`` = ``"1"``
* ``model``: ``"vit"`` (:class:`SA2VP`) or ``"swin"`` (:class:`SA2VPSwin`); absent means ``"vit"``
* ``config``: the model's config (:class:`SA2VPConfig` / :class:`SA2VPSwinConfig`) as JSON; ``num_classes``
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
from .swin import SA2VPSwin, SA2VPSwinConfig, build_swin_backbone, describe_swin_backbone
from .weights import build_backbone, describe_backbone

# model kind -> (model class, config class, backbone builder, backbone describer)
_KINDS = {
    "vit": (SA2VP, SA2VPConfig, build_backbone, describe_backbone),
    "swin": (SA2VPSwin, SA2VPSwinConfig, build_swin_backbone, describe_swin_backbone),
}

__all__ = ["save_checkpoint", "load_checkpoint", "read_metadata", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sa2vp"
FORMAT_VERSION = "1"
_RESERVED = ("format", "format_version", "model", "config", "num_classes", "backbone_name", "backbone_kwargs",
             "includes_backbone")


def _kind_of(model) -> str:
    for kind, (cls, *_rest) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"model must be an SA2VP or SA2VPSwin, got {type(model).__name__}")


def save_checkpoint(model: SA2VP | SA2VPSwin, path, *, include_backbone: bool = False, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s trainable parameters (and with ``include_backbone`` its frozen backbone) to ``path``.

    ``metadata``: extra string entries stored alongside (names must not clash with the reserved ones).
    """
    from safetensors.torch import save_file

    kind = _kind_of(model)
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
        "model": kind,
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
    meta.setdefault("model", "vit")
    if meta["model"] not in _KINDS:
        raise ValueError(f"{path}: unknown model kind {meta['model']!r} (expected one of {sorted(_KINDS)})")
    missing = [k for k in _RESERVED if k not in meta]
    if missing:
        raise ValueError(f"{path}: checkpoint metadata lacks {missing}")
    return meta


def load_checkpoint(path, backbone=None, pretrained_path=None) -> SA2VP | SA2VPSwin:
    """Rebuild the SA2VP (ViT or Swin) model saved by :func:`save_checkpoint`.

    Args:
        path: the ``.safetensors`` checkpoint.
        backbone: optional timm ViT / Swin instance to use (its structure must match the saved one); needed, or
            ``pretrained_path``, when the checkpoint does not include the backbone.
        pretrained_path: backbone weights file, for checkpoints without the backbone.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model_cls, config_cls, build, describe = _KINDS[meta["model"]]
    config = config_cls.from_json(meta["config"])
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
        backbone = build(name, kwargs)
    else:
        given = describe(backbone)
        diff = {k: (given.get(k), v) for k, v in kwargs.items() if given.get(k) != v}
        if diff:
            raise ValueError(f"backbone does not match the checkpoint's (given, saved): {diff}")
    model = model_cls(backbone, num_classes, config, pretrained_path=pretrained_path)
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
