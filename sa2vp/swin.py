"""SA2VP on a frozen timm Swin Transformer (the authors' second backbone).

The prompt pathway ``P`` starts as a learned low-rank map at the patch-embedding resolution (56 x 56
at 224 px), ``Linear(r, C0)`` and the frozen patch-embedding LayerNorm, with no position embedding.  It
runs through the same frozen stages as the image pathway ``X``, patch merging included, so the two stay
aligned at every resolution.  Inside the interaction stages (default: the third stage, 14 x 14 at
224 px) every block exchanges a spatially aligned message between the pathways:

    B2P block (prompt gathers from base):   P' = Block(P) + s * F(q=P, kv=X)
    P2B block (prompt adapts base):         X' = Block(X) + s * F(q=X, kv=P)

    F(q=A, kv=B) = Adapter(A + dropout(Wo LocalAttn(Wq n(A), Wk n(B), Wv n(B)))),  n = norm1
    Adapter(y)   = dropout(Up(dropout(GELU(Down(LN(y))))))

``F`` is computed from the states before the block and added after it.  The cross attention uses the
block's own frozen ``norm1``/``qkv``/``proj`` and heads on the whole stage map: a clipped ``3 x 3``
neighbourhood per token, without the block's windows, shift or relative-position bias.  ``norm1`` +
``qkv`` run once per pathway per block and feed both the block's (shifted) window attention and the
cross attention.  Blocks with index ``% 6 == 0`` within an interaction stage are B2P, the others P2B.

Both pathways end in the frozen final norm and the backbone's average pooling, then one trainable
head; the loss is ``0.8 CE(base) + 0.2 CE(prompt)`` and predictions use the base logits.  The prompt
pathway runs with batch 1 (and is broadcast) while it does not depend on the image, except when the
backbone's dropout or stochastic depth is active in training (timm's Swin builds with stochastic depth
0.1 by default): then it runs per image, so every image draws its own masks.

``config.backend="reference"`` composes plain PyTorch ops (the correctness oracle); the other backends
use the fused ``sa2vp_kernels`` ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import sa2vp_kernels
import timm
from sa2vp_kernels.reference import local_cross_attention_vectorized
from timm.layers import trunc_normal_
from timm.models import get_arch_name, is_model, model_entrypoint
from timm.models import swin_transformer as _swin
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)

from .config import _check_float, _check_window, _ConfigMixin
from .model import Adapter, PromptMap, SA2VPOutput, TrainableStateMixin, _is_stochastic, resolve_backbone
from .weights import _TORCH_SUFFIXES, _read_state_dict, _short

__all__ = [
    "SA2VPSwin",
    "SA2VPSwinConfig",
    "build_swin_backbone",
    "describe_swin_backbone",
    "is_swin_backbone",
    "load_swin_weights",
]


# ---------------------------------------------------------------------------------------------- config
def _check_int(name: str, value, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _index_tuple(name: str, value, allow_none: bool) -> tuple[int, ...] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a collection of indices, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise ValueError(f"{name} must hold non-negative int indices, got {value!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds an index twice: {value!r}")
    return tuple(sorted(out))


@dataclass
class SA2VPSwinConfig(_ConfigMixin):
    """Hyper-parameters of SA2VP on a Swin backbone (defaults: the authors' Swin-B settings).

    Attributes:
        r: inter-dim, the width of the prompt map and of the adapter bottleneck.
        s: inter-weight, the scale of the adapted cross-pathway message.
        stages: indices of the stages (timm's ``backbone.layers``) whose blocks exchange messages;
            ``(2,)`` is the third stage (14 x 14 at 224 px).
        b2p_blocks: block indices within every interaction stage where the prompt gathers from the base
            pathway (B2P); the other blocks are P2B.  None: ``{j : j % 6 == 0}``.
        window: odd side of the cross-attention neighbourhood.
        border: ``"clip"`` (out-of-grid neighbours dropped) or ``"zero"`` (score 0, value 0).
        prompt_grid: ``(h, w)`` grid of the learned prompt map; None: the backbone's patch grid.  A map
            on another grid is resampled bilinearly to the patch grid of every input.
        adapter_dropout: dropout inside the adapter (after GELU and after the up projection).
        attn_dropout: dropout on the cross-attention output (after the output projection).
        loss_weights: weights of the cross-entropy of the base logits and of the prompt logits.
        backend: kernel backend, one of ``sa2vp_kernels.BACKENDS``; ``"reference"`` is the unfused
            pure-PyTorch composition.
    """

    r: int = 8
    s: float = 0.5
    stages: tuple[int, ...] = (2,)
    b2p_blocks: tuple[int, ...] | None = None
    window: int = 3
    border: str = "clip"
    prompt_grid: tuple[int, int] | None = None
    adapter_dropout: float = 0.1
    attn_dropout: float = 0.1
    loss_weights: tuple[float, float] = (0.8, 0.2)
    backend: str = "auto"

    _LIST_FIELDS = ("stages", "b2p_blocks", "prompt_grid", "loss_weights")

    def __post_init__(self):
        _check_int("r", self.r, 1)
        self.s = _check_float("s", self.s)
        self.stages = _index_tuple("stages", self.stages, allow_none=False)
        if not self.stages:
            raise ValueError("stages must name at least one interaction stage")
        self.b2p_blocks = _index_tuple("b2p_blocks", self.b2p_blocks, allow_none=True)
        _check_window(self.window)
        self._check_common_fields()

    def b2p(self, depth: int) -> tuple[int, ...]:
        """B2P block indices of an interaction stage of ``depth`` blocks, validated."""
        if self.b2p_blocks is None:
            return tuple(j for j in range(depth) if j % 6 == 0)
        bad = [j for j in self.b2p_blocks if j >= depth]
        if bad:
            raise ValueError(f"b2p_blocks {self.b2p_blocks} holds blocks {bad} beyond an interaction stage's "
                             f"depth {depth}")
        return self.b2p_blocks


# ------------------------------------------------------------------------------------------- backbones
def is_swin_backbone(backbone) -> bool:
    """Whether ``backbone`` (a module, or a timm model name with or without pretrained tag) is a timm
    ``SwinTransformer`` (``swin_*``, ``swin_s3_*``; not Swin V2), i.e. a backbone for :class:`SA2VPSwin`."""
    if isinstance(backbone, nn.Module):
        return isinstance(backbone, SwinTransformer)
    if isinstance(backbone, str):
        return is_model(backbone) and model_entrypoint(get_arch_name(backbone)).__module__ == _swin.__name__
    raise TypeError(f"backbone must be an nn.Module or a timm model name, got {type(backbone).__name__}")


def describe_swin_backbone(swin: SwinTransformer) -> dict[str, Any]:
    """Constructor arguments that rebuild ``swin``'s structure (weights and drop rates aside), JSON-serialisable."""
    if not isinstance(swin, SwinTransformer):
        raise TypeError(f"backbone must be a timm SwinTransformer, got {type(swin).__name__}")
    pe = swin.patch_embed
    blocks = [stage.blocks[0] for stage in swin.layers]
    mlp_ratio = [b.mlp.fc1.out_features / b.dim for b in blocks]
    return dict(
        img_size=list(pe.img_size),
        patch_size=list(pe.patch_size),
        in_chans=int(pe.proj.in_channels),
        embed_dim=int(swin.embed_dim),
        depths=[len(stage.blocks) for stage in swin.layers],
        num_heads=[int(b.attn.num_heads) for b in blocks],
        head_dim=[int(b.attn.qkv.out_features // 3 // b.attn.num_heads) for b in blocks],
        window_size=[list(ws) for ws in getattr(swin, "_ref_window_sizes", [b.window_size for b in blocks])],
        always_partition=bool(blocks[0].always_partition),
        strict_img_size=bool(pe.strict_img_size),
        mlp_ratio=mlp_ratio[0] if len(set(mlp_ratio)) == 1 else mlp_ratio,
        qkv_bias=blocks[0].attn.qkv.bias is not None,
        global_pool=swin.global_pool,
        num_classes=0,
    )


def build_swin_backbone(name: str | None, kwargs: dict[str, Any] | None = None) -> SwinTransformer:
    """A timm Swin with random weights: ``timm.create_model(name, pretrained=False, **kwargs)``, or a plain
    ``SwinTransformer(**kwargs)`` when ``name`` is None (lists in ``kwargs`` are read as tuples)."""
    kwargs = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in (kwargs or {}).items()}
    if name is None:
        if not kwargs:
            raise ValueError("build_swin_backbone needs a timm model name or the SwinTransformer arguments")
        model = SwinTransformer(**kwargs)
    else:
        if not isinstance(name, str):
            raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
        if not is_swin_backbone(name):
            raise ValueError(f"timm model {name!r} is not a Swin Transformer (swin_*)")
        model = timm.create_model(name, pretrained=False, **kwargs)
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"timm model {name!r} is a {type(model).__name__}, not a SwinTransformer")
    return model


def load_swin_weights(swin: SwinTransformer, path) -> None:
    """Load pretrained Swin weights from a local file into ``swin`` (in place).

    ``.safetensors``, ``.pth``, ``.pt``, ``.bin``: a timm state dict or an original Microsoft Swin
    checkpoint (``{"model": ...}``, patch merging at the end of a stage); timm's ``checkpoint_filter_fn``
    maps the latter and resizes relative-position tables and patch embeddings.  Head weights in the file
    are ignored; every other backbone weight must be present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    if path.suffix != ".safetensors" and path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"unknown Swin weights format {path.suffix!r} for {path}; expected .safetensors or one "
                         f"of {_TORCH_SUFFIXES}")
    state = _swin.checkpoint_filter_fn(_read_state_dict(path), swin)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = swin.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"Swin weights in {path} do not fit the model: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"Swin weights in {path} do not match the model: missing {_short(missing)}, "
                         f"unexpected {_short(unexpected)}")


def _check_backbone(swin, stages) -> None:
    if not isinstance(swin, SwinTransformer):
        raise TypeError(f"backbone must be a timm SwinTransformer (or its name), got {type(swin).__name__}")
    for si, stage in enumerate(swin.layers):
        for j, blk in enumerate(stage.blocks):
            if not isinstance(blk, SwinTransformerBlock) or not isinstance(blk.attn, WindowAttention):
                raise ValueError(f"backbone stage {si} block {j} is a {type(blk).__name__}; SA2VPSwin supports "
                                 f"timm's SwinTransformerBlock with WindowAttention")
    bad = [i for i in stages if i >= len(swin.layers)]
    if bad:
        raise ValueError(f"stages {stages} holds stages {bad} beyond the backbone's {len(swin.layers)} stages")


# --------------------------------------------------------------------------------------------- model
class SA2VPSwin(TrainableStateMixin, nn.Module):
    """SA2VP over a frozen timm Swin Transformer.

    Args:
        backbone: a timm ``SwinTransformer`` or a timm model name (built with ``pretrained=False``).  An
            instance is taken over: its classifier is removed and its weights are frozen.
        num_classes: classes of the trainable head.
        config: an :class:`SA2VPSwinConfig` (default: the authors' Swin settings).
        pretrained_path: local file with the backbone's weights (timm or original Swin checkpoint).
        img_size: input size for the backbone (window sizes and relative-position tables follow timm's
            ``set_input_size``).
        backbone_kwargs: extra ``timm.create_model`` arguments when ``backbone`` is a name.
    """

    def __init__(self, backbone, num_classes: int, config: SA2VPSwinConfig | None = None, *, pretrained_path=None,
                 img_size=None, backbone_kwargs: dict | None = None):
        super().__init__()
        config = SA2VPSwinConfig() if config is None else config
        if not isinstance(config, SA2VPSwinConfig):
            raise TypeError(f"config must be an SA2VPSwinConfig or None, got {type(config).__name__}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        backbone, name = resolve_backbone(backbone, SwinTransformer, build_swin_backbone, img_size, backbone_kwargs)
        if pretrained_path is not None:
            load_swin_weights(backbone, pretrained_path)
        _check_backbone(backbone, config.stages)
        backbone.reset_classifier(0)
        backbone.requires_grad_(False)

        self.config = config
        self.num_classes = num_classes
        self.backbone = backbone
        self.backbone_name = name
        self.backbone_kwargs = describe_swin_backbone(backbone)
        self.prompt_grid = tuple(config.prompt_grid or backbone.patch_embed.grid_size)
        self.stages = frozenset(config.stages)
        self.b2p_blocks = {i: frozenset(config.b2p(len(backbone.layers[i].blocks))) for i in config.stages}
        self._stochastic = _is_stochastic(backbone)

        r = config.r
        self.prompt = PromptMap(self.prompt_grid[0] * self.prompt_grid[1], r, backbone.embed_dim)
        self.adapters = nn.ModuleDict({
            str(i): nn.ModuleList(Adapter(blk.dim, r) for blk in backbone.layers[i].blocks) for i in config.stages
        })
        self.head = nn.Linear(backbone.head_hidden_size, num_classes)
        trunc_normal_(self.head.weight, std=0.02)

    def set_backend(self, backend: str) -> "SA2VPSwin":
        """Switch the kernel backend (``config.backend``) in place; returns the model."""
        self.config = self.config.replace(backend=backend)
        return self

    @property
    def block_ids(self) -> list[tuple[int, int]]:
        """``(stage, block)`` of every backbone block, in order (``p2b_messages`` takes either form)."""
        return [(si, j) for si, stage in enumerate(self.backbone.layers) for j in range(len(stage.blocks))]

    @property
    def p2b_blocks(self) -> list[tuple[int, int]]:
        """``(stage, block)`` of every P2B block (the blocks that send a message to the image)."""
        return [(si, j) for si, j in self.block_ids if si in self.stages and j not in self.b2p_blocks[si]]

    # ------------------------------------------------------------------------------------------ parts
    def _prompt_tokens(self, grid) -> torch.Tensor:
        """``patch_embed.norm(Up(E))`` with ``E`` resampled to the patch ``grid``: ``(1, H, W, C0)``."""
        prompt, cfg = self.prompt, self.config
        if cfg.backend != "reference":
            p = sa2vp_kernels.prompt_map(prompt.embed, prompt.proj.weight, prompt.proj.bias, None, grid,
                                         num_prefix=0, embed_grid=self.prompt_grid, backend=cfg.backend)
        else:
            rows = prompt.embed
            if tuple(grid) != self.prompt_grid:
                image = rows.t().reshape(1, -1, *self.prompt_grid)
                image = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False)
                rows = image.flatten(2)[0].t()
            p = prompt.proj(rows)
        return self.backbone.patch_embed.norm(p.reshape(1, grid[0], grid[1], -1))

    @staticmethod
    def _qkv(blk: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
        """``qkv(norm1(x))`` of a block on the whole ``(B, H, W, C)`` map: ``(B, H, W, 3 * attn_dim)``."""
        return blk.attn.qkv(blk.norm1(x))

    def _window_attention(self, blk: SwinTransformerBlock, t: torch.Tensor) -> torch.Tensor:
        """timm's ``blk._attn(blk.norm1(x))`` given ``t = qkv(norm1(x))``: (shifted) window attention."""
        attn = blk.attn
        B, H, W, D3 = t.shape
        (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
        if sh or sw:
            t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2))
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        if pad_h or pad_w:
            # timm pads norm1(x) with zeros before qkv: padded tokens carry qkv(0) = the qkv bias.
            fill = attn.qkv.bias.to(t.dtype) if attn.qkv.bias is not None else t.new_zeros(D3)
            t = torch.cat([t, fill.expand(B, H, pad_w, D3)], dim=2)
            t = torch.cat([t, fill.expand(B, pad_h, W + pad_w, D3)], dim=1)
        Hp, Wp = H + pad_h, W + pad_w
        windows = window_partition(t, (wh, ww)).view(-1, wh * ww, 3, attn.num_heads, D3 // 3 // attn.num_heads)
        q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)
        nwb, area = q.shape[0], q.shape[2]
        mask = attn._get_rel_pos_bias()
        shift_mask = blk.get_attn_mask(t) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
        if shift_mask is not None:
            nw = shift_mask.shape[0]
            shift_mask = shift_mask.view(1, nw, 1, area, area).expand(nwb // nw, -1, attn.num_heads, -1, -1)
            mask = mask + shift_mask.reshape(nwb, attn.num_heads, area, area)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=attn.attn_drop.p if self.training else 0.0)
        o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(nwb, area, -1)))
        o = window_reverse(o.view(-1, wh, ww, o.shape[-1]), (wh, ww), Hp, Wp)[:, :H, :W]
        if sh or sw:
            o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
        return o

    def _block(self, blk: SwinTransformerBlock, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``blk(x)`` given ``t = qkv(norm1(x))``: window attention, drop path, MLP (timm's NHWC block)."""
        B, H, W, C = x.shape
        x = x + blk.drop_path1(self._window_attention(blk, t))
        x = x.reshape(B, H * W, C)
        x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        return x.reshape(B, H, W, C)

    @staticmethod
    def _split(attn: WindowAttention, t: torch.Tensor, index: int) -> torch.Tensor:
        """q (0), k (1) or v (2) of ``t = qkv(...)`` ``(B, H, W, 3A)`` as a ``(B, heads, H*W, A / heads)`` view."""
        B, H, W, D3 = t.shape
        return t.reshape(B, H * W, 3, attn.num_heads, D3 // 3 // attn.num_heads)[:, :, index].transpose(1, 2)

    def _cross(self, blk: SwinTransformerBlock, h: torch.Tensor, t_q: torch.Tensor, t_kv: torch.Tensor) -> torch.Tensor:
        """The cross block up to the adapter, ``h + dropout(Wo LocalAttn(q, k, v))``, as ``(B, H*W, C)``.

        ``h`` ``(b, H, W, C)``: the query pathway; ``t_q`` / ``t_kv``: ``qkv(norm1(.))`` of the query /
        key-value pathway.  Batches of 1 broadcast.
        """
        cfg, attn = self.config, blk.attn
        q, k, v = self._split(attn, t_q, 0), self._split(attn, t_kv, 1), self._split(attn, t_kv, 2)
        B, heads, N, d = max(q.shape[0], k.shape[0]), *q.shape[1:]
        q, k, v = q.expand(B, -1, -1, -1), k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        grid = tuple(t_q.shape[1:3])
        if cfg.backend == "reference":
            a = local_cross_attention_vectorized(q, k, v, grid, cfg.window, 0, cfg.border, d ** -0.5)
        else:
            a = sa2vp_kernels.local_cross_attention(q, k, v, grid, window=cfg.window, num_prefix=0,
                                                    border=cfg.border, scale=d ** -0.5, backend=cfg.backend)
        a = a.transpose(1, 2).reshape(B, N, heads * d)
        h = h.reshape(h.shape[0], N, h.shape[-1])
        return h + F.dropout(attn.proj(a), cfg.attn_dropout, self.training)

    def _adapt_add(self, adapter: Adapter, target: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        """``target + s * Adapter(message)``; ``target`` ``(b, H, W, C)``, ``message`` ``(B, H*W, C)``."""
        cfg = self.config
        b, H, W, C = target.shape
        B = message.shape[0]
        target = target.reshape(b, H * W, C).expand(B, -1, -1)
        p = cfg.adapter_dropout if self.training else 0.0
        if cfg.backend == "reference":
            out = target + cfg.s * adapter(message, p)
        else:
            out = sa2vp_kernels.prompt_add(
                target, message, cfg.s, adapter.norm.weight, adapter.norm.bias, adapter.down.weight,
                adapter.down.bias, adapter.up.weight, adapter.up.bias, dropout_p=p, eps=adapter.norm.eps,
                backend=cfg.backend)
        return out.reshape(B, H, W, C)

    def _classify(self, t: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return self.head(bb.forward_head(bb.norm(t), pre_logits=True))

    # ---------------------------------------------------------------------------------------- forward
    def _encode(self, images: torch.Tensor, record: tuple[int, int] | None = None):
        """Run both pathways through all stages; returns ``(X, P, message)`` (NHWC maps).

        With ``record`` = ``(stage, block)`` of a P2B block the loop stops at that block and ``message``
        is the ``s * F`` it added to the base pathway (adapter dropout off), ``(B, H*W, C)``.
        """
        bb = self.backbone
        x = bb.patch_embed(images)
        p = self._prompt_tokens(tuple(x.shape[1:3]))
        if self.training and self._stochastic:
            p = p.expand(x.shape[0], -1, -1, -1)
        for si, stage in enumerate(bb.layers):
            if si not in self.stages:
                x, p = stage(x), stage(p)
                continue
            x, p = stage.downsample(x), stage.downsample(p)
            for j, blk in enumerate(stage.blocks):
                adapter = self.adapters[str(si)][j]
                t_x, t_p = self._qkv(blk, x), self._qkv(blk, p)
                if j in self.b2p_blocks[si]:
                    message = self._cross(blk, p, t_p, t_x)
                    p_out = self._block(blk, p, t_p)
                    x = self._block(blk, x, t_x)
                    p = self._adapt_add(adapter, p_out, message)
                else:
                    message = self._cross(blk, x, t_x, t_p)
                    if record == (si, j):
                        return x, p, self.config.s * adapter(message, 0.0)
                    p = self._block(blk, p, t_p)
                    x = self._adapt_add(adapter, self._block(blk, x, t_x), message)
        return x, p, None

    def forward(self, images: torch.Tensor) -> SA2VPOutput:
        x, p, _ = self._encode(images)
        logits = self._classify(x)
        prompt_logits = self._classify(p).expand_as(logits)
        return SA2VPOutput(logits, prompt_logits)

    @torch.no_grad()
    def p2b_messages(self, images: torch.Tensor, layer) -> torch.Tensor:
        """``(B, H, W)``: the norm of the message ``s * F`` that a P2B block adds to every image token.

        ``layer``: the block as ``(stage, block)`` or as its index in the whole backbone (timm's order,
        counting the blocks of every stage); ``H x W`` is that stage's grid.
        """
        ids = self.block_ids
        if isinstance(layer, int) and not isinstance(layer, bool):
            if not 0 <= layer < len(ids):
                raise ValueError(f"layer must be a block index in [0, {len(ids)}) or a (stage, block) pair, "
                                 f"got {layer!r}")
            layer = ids[layer]
        elif isinstance(layer, (tuple, list)) and tuple(layer) in ids:
            layer = tuple(layer)
        else:
            raise ValueError(f"layer must be a block index in [0, {len(ids)}) or a (stage, block) pair of the "
                             f"backbone, got {layer!r}")
        if layer not in self.p2b_blocks:
            kind = "a B2P block" if layer[0] in self.stages else "outside the interaction stages"
            flat = [ids.index(b) for b in self.p2b_blocks]
            raise ValueError(f"block {layer} is {kind} (it sends no message to the image); P2B blocks "
                             f"(stage, block): {self.p2b_blocks}, as block indices: {flat}")
        x, _, message = self._encode(images, record=layer)
        return message.norm(dim=-1).reshape(x.shape[:3])

    def extra_repr(self) -> str:
        cfg = self.config
        b2p = {i: sorted(b) for i, b in sorted(self.b2p_blocks.items())}
        return (f"backbone={self.backbone_name!r}, num_classes={self.num_classes}, r={cfg.r}, s={cfg.s}, "
                f"stages={sorted(self.stages)}, b2p={b2p}, border={cfg.border!r}, prompt_grid={self.prompt_grid}, "
                f"backend={cfg.backend!r}")
