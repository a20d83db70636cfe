"""Read the authors' SA2VP training checkpoints (ViT backbone) into our model.

Their checkpoint is ``torch.save({"model": state_dict, "optimizer": ..., "epoch": ..., "args": ...})`` of
a wrapper with ``vit_base`` (a jeonsworld-style ViT carrying the SA2VP parts) and ``class_head``.  Both
of their model files (``vit_tinypara.py`` = variant ``paper``, ``vit_tinypara_acc.py`` = variant
``official-acc``) have the same keys, so the variant must be named.  Neither ``s`` (their
``add_scale``) nor the layer sets are stored; ``s`` defaults to 0.1 and the ``J`` deep prompts of the
checkpoint go to the first ``J`` B2P layers after layer 0 (their ``prompt_list``: 4, 8).

Inferred from shapes: width C, depth, patch size, token grid (square), r, number of classes and of deep
prompts.  The number of heads is not in the weights: it defaults to the standard ViT of that width
(head width 64; 16 heads for ViT-H) and can be given.

Their cross blocks hold redundant copies of block i's frozen ``attention_norm`` and
``query/key/value/out`` weights; ours use the block's own weights, so these copies are only checked to
equal the block's.  Their backbone was trained with dropout 0.1 in the MLPs and on the embeddings; the
converted timm backbone has timm's defaults (no dropout), which changes nothing in eval mode.

:data:`KEY_TABLE` is the whole mapping.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from .config import SA2VPConfig, VARIANTS
from .model import SA2VP
from .weights import build_backbone, load_backbone_weights

__all__ = ["KEY_TABLE", "load_official_checkpoint", "convert_state_dict", "main"]

# (authors' key, our key, rule).  Placeholders: {i} block index, {p} "weight" or "bias", {j} index of
# a deep prompt in the authors' stacks, {d} the block that deep prompt belongs to.  Rules:
#   copy     the tensor as is
#   q, k, v  one third of our fused qkv (rows [0, C), [C, 2C), [2C, 3C))
#   squeeze  drop the leading singleton dimension: (1, N, r) -> (N, r)
#   stacked  row j of a stack over deep prompts (deep_ppt (J, 1, N, r), cross_conv (J', C))
#   tied     a redundant copy of a frozen weight of block i (tied-q/k/v: a third of qkv): checked, not loaded
_V = "vit_base.transformer."
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    # frozen ViT
    (_V + "embeddings.patch_embeddings.{p}", "backbone.patch_embed.proj.{p}", "copy"),
    (_V + "embeddings.cls_token", "backbone.cls_token", "copy"),
    (_V + "embeddings.position_embeddings", "backbone.pos_embed", "copy"),
    (_V + "encoder.layer.{i}.attention_norm.{p}", "backbone.blocks.{i}.norm1.{p}", "copy"),
    (_V + "encoder.layer.{i}.attn.query.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "q"),
    (_V + "encoder.layer.{i}.attn.key.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "k"),
    (_V + "encoder.layer.{i}.attn.value.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "v"),
    (_V + "encoder.layer.{i}.attn.out.{p}", "backbone.blocks.{i}.attn.proj.{p}", "copy"),
    (_V + "encoder.layer.{i}.ffn_norm.{p}", "backbone.blocks.{i}.norm2.{p}", "copy"),
    (_V + "encoder.layer.{i}.ffn.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}", "copy"),
    (_V + "encoder.layer.{i}.ffn.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}", "copy"),
    (_V + "encoder.encoder_norm.{p}", "backbone.norm.{p}", "copy"),
    # prompts
    (_V + "embeddings.ppt", "prompt.embed", "squeeze"),
    (_V + "embeddings.ppt_proj.{p}", "prompt.proj.{p}", "copy"),
    (_V + "encoder.deep_ppt", "deep_prompts.{d}.embed", "stacked"),
    (_V + "encoder.deep_proj.{j}.{p}", "deep_prompts.{d}.proj.{p}", "copy"),
    (_V + "encoder.cross_conv", "deep_prompts.{d}.scale", "stacked"),
    # cross blocks: trainable LN + adapter ...
    (_V + "encoder.cross_attn.{i}.ffn_norm.{p}", "adapters.{i}.norm.{p}", "copy"),
    (_V + "encoder.cross_attn.{i}.ffn.fc1.{p}", "adapters.{i}.down.{p}", "copy"),
    (_V + "encoder.cross_attn.{i}.ffn.fc2.{p}", "adapters.{i}.up.{p}", "copy"),
    # ... and the redundant copies of block i's frozen attention weights
    (_V + "encoder.cross_attn.{i}.attention_norm.{p}", "backbone.blocks.{i}.norm1.{p}", "tied"),
    (_V + "encoder.cross_attn.{i}.attn.to_q.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "tied-q"),
    (_V + "encoder.cross_attn.{i}.attn.to_k.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "tied-k"),
    (_V + "encoder.cross_attn.{i}.attn.to_v.{p}", "backbone.blocks.{i}.attn.qkv.{p}", "tied-v"),
    (_V + "encoder.cross_attn.{i}.attn.to_out.{p}", "backbone.blocks.{i}.attn.proj.{p}", "tied"),
    # classifier
    ("class_head.{p}", "head.{p}", "copy"),
)

_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_NAME_BY_SHAPE = {(192, 12): "vit_tiny", (384, 12): "vit_small", (768, 12): "vit_base", (1024, 24): "vit_large",
                  (1280, 32): "vit_huge"}
_QKV_PART = {"q": 0, "k": 1, "v": 2}


def _compile(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    regex = regex.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    regex = regex.replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


_TABLE = tuple((_compile(a), ours, rule) for a, ours, rule in KEY_TABLE)


def _match(key: str):
    for regex, ours, rule in _TABLE:
        m = regex.match(key)
        if m:
            return m.groupdict(), ours, rule
    return None


def _read_checkpoint(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        if trust_pickle:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        hint = "" if trust_pickle else (" If the file comes from a source you trust and holds other Python "
                                        "objects, retry with trust_pickle=True (--trust-pickle).")
        raise ValueError(f"could not read {path} as a torch checkpoint: {exc}.{hint}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds no state dict (expected a dict with key 'model')")
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} of the state dict is a {type(v).__name__}, not a tensor")
        state[k[len("module."):] if k.startswith("module.") else k] = v
    if not any(k.startswith(_V) for k in state):
        raise ValueError(f"{path} is not an SA2VP ViT checkpoint of the authors' code "
                         f"(no '{_V}...' keys; found e.g. {sorted(state)[:4]})")
    return state


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"official checkpoint lacks {key!r}")
    return state[key]


def _layer_indices(state: dict, stem: str) -> list[int]:
    regex = re.compile(re.escape(_V + stem) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def _peek_patch_size(path: Path) -> tuple[int, int]:
    """The patch size stored in a backbone weights file (npz or state dict)."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(str(path)) as w:
            for key in w.files:
                if key.endswith("embedding/kernel"):
                    return tuple(int(s) for s in w[key].shape[:2])
        raise ValueError(f"{path} has no 'embedding/kernel' (not a ViT npz checkpoint)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "patch_embed.proj.weight" in f.keys():
                return tuple(f.get_slice("patch_embed.proj.weight").get_shape()[2:])
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
        if isinstance(sd, dict) and "patch_embed.proj.weight" in sd:
            return tuple(sd["patch_embed.proj.weight"].shape[2:])
    raise ValueError(f"{path} has no 'patch_embed.proj.weight' (not a timm ViT state dict)")


def _build_model(state, variant, num_classes, num_heads, s, backbone_path):
    has_backbone = any(k.startswith(_V + "encoder.layer.") for k in state)
    ppt = _require(state, _V + "embeddings.ppt")
    if ppt.dim() != 3 or ppt.shape[0] != 1:
        raise ValueError(f"embeddings.ppt must have shape (1, N, r), got {tuple(ppt.shape)}")
    n_tokens, r = int(ppt.shape[1]), int(ppt.shape[2])
    width = int(_require(state, _V + "embeddings.ppt_proj.weight").shape[0])
    head_w = _require(state, "class_head.weight")
    if num_classes is not None and head_w.shape[0] != num_classes:
        raise ValueError(f"num_classes={num_classes}, but class_head.weight has {head_w.shape[0]} classes")
    num_classes = int(head_w.shape[0])
    depth_cross = _layer_indices(state, "encoder.cross_attn")
    depth = len(depth_cross)
    if depth_cross != list(range(depth)) or depth == 0:
        raise ValueError(f"cross blocks must be numbered 0..L-1, found {depth_cross}")
    if has_backbone:
        layers = _layer_indices(state, "encoder.layer")
        if layers != depth_cross:
            raise ValueError(f"blocks {layers} and cross blocks {depth_cross} of the checkpoint differ")
        patch = tuple(int(s) for s in _require(state, _V + "embeddings.patch_embeddings.weight").shape[2:])
        in_chans = int(state[_V + "embeddings.patch_embeddings.weight"].shape[1])
        mlp_hidden = int(_require(state, _V + "encoder.layer.0.ffn.fc1.weight").shape[0])
        pos = _require(state, _V + "embeddings.position_embeddings")
        if tuple(pos.shape) != (1, n_tokens, width):
            raise ValueError(f"position_embeddings {tuple(pos.shape)} and ppt {tuple(ppt.shape)} disagree on N or C")
    else:
        if backbone_path is None:
            raise ValueError("the checkpoint holds no backbone weights (no encoder.layer.* keys); pass "
                             "backbone_path= (the ViT weights it was trained from)")
        patch, in_chans, mlp_hidden = _peek_patch_size(Path(backbone_path)), 3, 4 * width
    side = math.isqrt(n_tokens - 1)
    if side * side != n_tokens - 1:
        raise ValueError(f"the prompt map has {n_tokens} = 1 + {n_tokens - 1} rows; the authors' token grid "
                         f"is square, and {n_tokens - 1} is not a square")
    if num_heads is None:
        if width not in _HEADS_BY_WIDTH:
            raise ValueError(f"width {width} is not a standard ViT width {sorted(_HEADS_BY_WIDTH)}; pass num_heads")
        num_heads = _HEADS_BY_WIDTH[width]
    img_size = (side * patch[0], side * patch[1])
    kwargs = dict(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=width, depth=depth,
                  num_heads=num_heads, mlp_ratio=mlp_hidden / width, qkv_bias=True, num_classes=0)
    stem = _NAME_BY_SHAPE.get((width, depth))
    name = None
    if stem is not None and patch[0] == patch[1] and num_heads == _HEADS_BY_WIDTH[width] and mlp_hidden == 4 * width:
        import timm

        candidate = f"{stem}_patch{patch[0]}_224"
        name = candidate if timm.is_model(candidate) else None
    backbone = build_backbone(name, kwargs)
    if not has_backbone:
        load_backbone_weights(backbone, backbone_path)

    deep_ppt = state.get(_V + "encoder.deep_ppt")
    n_deep = 0 if deep_ppt is None else int(deep_ppt.shape[0])
    b2p, _ = SA2VPConfig().layers(depth)
    candidates = [i for i in b2p if i != 0]
    if n_deep > len(candidates):
        raise ValueError(f"the checkpoint has {n_deep} deep prompts but depth {depth} has only B2P blocks {candidates}")
    config = SA2VPConfig.from_variant(variant, r=r, s=s, deep_layers=tuple(candidates[:n_deep]))
    return SA2VP(backbone, num_classes, config), has_backbone


def convert_state_dict(state: dict[str, torch.Tensor], model: SA2VP, *, has_backbone: bool = True):
    """Map the authors' state dict onto ``model``'s names (see :data:`KEY_TABLE`).

    Returns ``(ours, tied, ignored)``: our tensors by name; ``(authors' key, our key, tensor)`` of the
    redundant frozen copies still to check; authors' keys that their forward never reads.
    """
    deep_layers = sorted(model.deep_layers)
    ours: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, dict[int, torch.Tensor]] = {}
    tied, ignored, unknown = [], [], []
    for key, tensor in state.items():
        hit = _match(key)
        if hit is None:
            unknown.append(key)
            continue
        groups, target, rule = hit
        if not has_backbone and target.startswith("backbone.") and not rule.startswith("tied"):
            unknown.append(key)
            continue
        if rule == "stacked":
            if tensor.shape[0] < len(deep_layers):
                raise ValueError(f"{key} stacks {tensor.shape[0]} deep prompts, fewer than {len(deep_layers)}")
            for j, d in enumerate(deep_layers):
                row = tensor[j]
                ours[target.format(d=d)] = row.reshape(row.shape[-2:]) if row.dim() > 2 else row
            if tensor.shape[0] > len(deep_layers):
                ignored.append(f"{key}[{len(deep_layers)}:]")
            continue
        if "j" in groups:
            j = int(groups["j"])
            if j >= len(deep_layers):
                ignored.append(key)
                continue
            groups = {**groups, "d": deep_layers[j]}
        target = target.format(**groups)
        if rule == "copy":
            ours[target] = tensor
        elif rule == "squeeze":
            ours[target] = tensor.reshape(tensor.shape[1:])
        elif rule in _QKV_PART:
            qkv_parts.setdefault(target, {})[_QKV_PART[rule]] = tensor
        elif rule.startswith("tied"):
            part = _QKV_PART.get(rule.partition("-")[2])
            tied.append((key, target, part, tensor))
        else:  # pragma: no cover - the table only holds the rules above
            raise AssertionError(rule)
    if unknown:
        raise ValueError(f"official checkpoint has keys this converter does not know: {sorted(unknown)[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    for target, parts in qkv_parts.items():
        if sorted(parts) != [0, 1, 2]:
            names = [n for n, i in _QKV_PART.items() if i not in parts]
            raise ValueError(f"{target}: the checkpoint lacks the {names} part(s) of the attention")
        ours[target] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return ours, tied, ignored


def _check_tied(model: SA2VP, tied) -> None:
    own = model.state_dict()
    width = model.backbone.blocks[0].attn.attn_dim
    for key, target, part, tensor in tied:
        ref = own[target]
        if part is not None:
            ref = ref[part * width:(part + 1) * width]
        if tuple(ref.shape) != tuple(tensor.shape) or not torch.equal(ref.to(tensor.dtype), tensor):
            detail = (f"shape {tuple(tensor.shape)} vs {tuple(ref.shape)}" if tuple(ref.shape) != tuple(tensor.shape)
                      else f"max abs difference {(ref.to(tensor.dtype) - tensor).abs().max().item():.3g}")
            raise ValueError(
                f"{key} is the cross block's copy of the frozen weight {target}"
                f"{'' if part is None else ' (' + 'qkv'[part] + ' part)'} but differs from it ({detail}); "
                f"the checkpoint is inconsistent (were the frozen copies trained or the backbone replaced?)"
            )


def load_official_checkpoint(path, variant: str, num_classes: int | None = None, backbone_path=None, *,
                             s: float = 0.1, num_heads: int | None = None, trust_pickle: bool = False):
    """Build our :class:`SA2VP` from an authors' training checkpoint.

    Args:
        path: their ``checkpoint-*.pth`` (a dict with key ``model``).
        variant: ``"paper"`` (``vit_tinypara.py``) or ``"official-acc"`` (``vit_tinypara_acc.py``).
        num_classes: checked against the classifier's shape when given.
        backbone_path: the ViT weights (``.npz`` or timm file) the checkpoint was trained from; needed when
            the checkpoint holds only the SA2VP parameters, and checked equal to the checkpoint's backbone
            otherwise.
        s: the inter-weight (their ``add_scale``; not stored in the checkpoint).
        num_heads: backbone heads, when the width is not a standard ViT's.
        trust_pickle: read the file with ``weights_only=False`` (only for files you trust).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    state = _read_checkpoint(Path(path), trust_pickle)
    model, has_backbone = _build_model(state, variant, num_classes, num_heads, s, backbone_path)
    ours, tied, ignored = convert_state_dict(state, model, has_backbone=has_backbone)
    expected = dict(model.trainable_parameters())
    if has_backbone:
        expected.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(f"official checkpoint does not fill the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    bad = [f"{k}: {tuple(ours[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(ours[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"official checkpoint shapes do not fit the model (checkpoint vs model): {bad[:10]}")
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        if has_backbone:
            model.backbone.load_state_dict({k[len("backbone."):]: v.to(dtype) for k, v in ours.items()
                                            if k.startswith("backbone.")}, strict=True)
        model.load_trainable_state_dict({k: v.to(dtype) for k, v in ours.items() if not k.startswith("backbone.")})
    if has_backbone and backbone_path is not None:
        reference = build_backbone(model.backbone_name, model.backbone_kwargs)
        load_backbone_weights(reference, backbone_path)
        ref_state = reference.state_dict()
        for k, v in model.backbone.state_dict().items():
            if k in ref_state and not torch.equal(ref_state[k], v):
                raise ValueError(f"the checkpoint's backbone differs from {backbone_path} at {k!r}")
    _check_tied(model, tied)
    model.conversion_notes = ignored
    return model


def main(argv=None) -> int:
    """``sa2vp convert-official IN OUT --variant {paper,official-acc}``: authors' checkpoint -> ours."""
    from .checkpoint import save_checkpoint

    parser = argparse.ArgumentParser(
        prog="sa2vp convert-official",
        description="Convert an SA2VP checkpoint of the authors' code (ViT) into an sa2vp safetensors checkpoint.",
    )
    parser.add_argument("input", help="the authors' checkpoint (.pth, a dict with key 'model')")
    parser.add_argument("output", help="where to write the .safetensors checkpoint")
    parser.add_argument("--variant", required=True, choices=tuple(VARIANTS),
                        help="paper = their vit_tinypara.py, official-acc = their vit_tinypara_acc.py")
    parser.add_argument("--inter-weight", "-s", dest="s", type=float, default=0.1,
                        help="inter-weight s the checkpoint was trained with (their add_scale; default 0.1)")
    parser.add_argument("--num-classes", type=int, default=None, help="check the classifier has this many classes")
    parser.add_argument("--num-heads", type=int, default=None, help="backbone heads for a non-standard width")
    parser.add_argument("--backbone", default=None,
                        help="ViT weights the checkpoint was trained from (needed if it holds only SA2VP parameters)")
    parser.add_argument("--trainable-only", action="store_true",
                        help="save only the trainable parameters (the backbone must then be supplied at load time)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load the input with weights_only=False (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        model = load_official_checkpoint(args.input, args.variant, args.num_classes, args.backbone, s=args.s,
                                         num_heads=args.num_heads, trust_pickle=args.trust_pickle)
        save_checkpoint(model, args.output, include_backbone=not args.trainable_only)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sa2vp convert-official: error: {exc}", file=sys.stderr)
        return 1
    cfg = model.config
    print(f"converted {args.input} -> {args.output}: variant={args.variant}, backbone={model.backbone_name or 'ViT'} "
          f"(width {model.backbone.embed_dim}, depth {len(model.backbone.blocks)}), r={cfg.r}, s={cfg.s}, "
          f"classes={model.num_classes}, deep prompts at blocks {sorted(model.deep_layers)}")
    if model.conversion_notes:
        print(f"not used by the authors' forward (ignored): {', '.join(model.conversion_notes)}")
    return 0
