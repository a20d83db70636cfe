"""SA2VP on a frozen timm VisionTransformer.

Two pathways run through the same frozen blocks: the base pathway ``X`` (the image tokens) and the prompt
pathway ``P`` (a learned 2-D prompt map on the token grid).  In every block one pathway sends the other
a spatially aligned message:

    B2P block i (prompt gathers from base):   P' = Block_i(P) [+ c_j * Block_i(Up_j(E_j))] + s * F_i(q=P, kv=X)
    P2B block i (prompt adapts base):         X' = Block_i(X) + s * F_i(q=X, kv=P)

    F_i(q=A, kv=B) = Adapter_i(A + dropout(Wo_i LocalAttn(Wq_i n(A), Wk_i n(B), Wv_i n(B)))),  n = norm1_i
    Adapter_i(y)   = dropout(Up(dropout(GELU(Down(LN_i(y))))))

``F`` is computed from the states before the block and added after it.  The cross attention uses block
i's own frozen ``norm1``/``qkv``/``proj``: ``norm1`` + ``qkv`` run once per pathway per block and feed
both the block's self-attention and the cross attention (q/k after the block's q/k norm when it has one;
the cross output gets no LayerScale).  Both pathways end in the backbone's frozen
final norm and one trainable head on token 0 (the CLS token), the loss is ``0.8 CE(base) + 0.2 CE(prompt)``
and predictions use the base logits.  Backbones that pool otherwise (``global_pool="avg"``, ``"map"``, ...)
are pooled the way timm pools them (``forward_head(..., pre_logits=True)``: pooling, ``fc_norm``) before
the head.  The prompt map enters the blocks like the image tokens: position embedding, the backbone's
embedding dropout and ``norm_pre``; deep prompts get neither position embedding nor dropout.

The prompt map, the deep-prompt blocks and every prompt-pathway block whose input does not depend on
the image yet run once with batch 1 and are broadcast.  (When the backbone's own dropout or stochastic
depth is active in training they run per image instead, so that every image draws its own masks, as in
the authors' code.)

``config.backend="reference"`` composes plain PyTorch ops (the correctness oracle); the other backends
use the fused ``sa2vp_kernels`` ops.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import sa2vp_kernels
from sa2vp_kernels.reference import local_cross_attention_vectorized
from timm.layers import Attention, DropPath, PatchDropout, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from .config import VARIANTS, SA2VPConfig
from .weights import backbone_name, build_backbone, describe_backbone, load_backbone_weights

__all__ = ["SA2VP", "SA2VPOutput", "PromptMap", "DeepPrompt", "Adapter"]


class SA2VPOutput(NamedTuple):
    """``logits`` (base pathway, used for prediction) and ``prompt_logits`` (prompt pathway)."""

    logits: torch.Tensor
    prompt_logits: torch.Tensor


def _init_linear(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.normal_(linear.bias, std=1e-6)


class PromptMap(nn.Module):
    """Low-rank prompt map: ``embed`` (prefix rows + ``h * w`` grid rows, ``r``) and ``proj = Linear(r, C)``."""

    def __init__(self, rows: int, r: int, dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(rows, r))
        self.proj = nn.Linear(r, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.embed, std=0.02)
        _init_linear(self.proj)


class DeepPrompt(PromptMap):
    """A prompt map added to a B2P block's prompt output, scaled per channel by ``scale``."""

    def __init__(self, rows: int, r: int, dim: int):
        super().__init__(rows, r, dim)
        self.scale = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, std=0.02)


class Adapter(nn.Module):
    """``LN -> Linear(C, r) -> GELU -> dropout -> Linear(r, C) -> dropout`` (no residual)."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, r)
        self.up = nn.Linear(r, dim)
        _init_linear(self.down)
        _init_linear(self.up)

    def forward(self, x: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
        x = F.gelu(self.down(self.norm(x)))
        x = self.up(F.dropout(x, dropout_p, self.training))
        return F.dropout(x, dropout_p, self.training)


def _resolve_config(config: SA2VPConfig | None, variant: str | None) -> SA2VPConfig:
    if config is None:
        return SA2VPConfig.from_variant(variant) if variant is not None else SA2VPConfig()
    if not isinstance(config, SA2VPConfig):
        raise TypeError(f"config must be an SA2VPConfig or None, got {type(config).__name__}")
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        clash = {k: getattr(config, k) for k, v in VARIANTS[variant].items() if getattr(config, k) != v}
        if clash:
            raise ValueError(
                f"variant={variant!r} sets {VARIANTS[variant]}, but config has {clash}; pass one of them, or "
                f"build the config with SA2VPConfig.from_variant({variant!r}, ...)"
            )
    return config


def _check_backbone(vit) -> None:
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"backbone must be a timm VisionTransformer (or its name), got {type(vit).__name__}")
    if isinstance(vit.patch_drop, PatchDropout):
        raise ValueError("backbone uses patch dropout (patch_drop_rate > 0), which breaks the token grid SA2VP needs")
    for i, blk in enumerate(vit.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise ValueError(
                f"backbone block {i} is a {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                f"SA2VP supports timm's pre-norm Block with the standard Attention"
            )
        if getattr(blk.attn, "gate", None) is not None:
            raise ValueError(f"backbone block {i} uses gated attention, which SA2VP does not support")


def _is_stochastic(vit: nn.Module) -> bool:
    """Whether the backbone has dropout or stochastic depth that is active in training mode."""
    for m in vit.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if isinstance(m, DropPath) and m.drop_prob > 0:
            return True
    return False


class TrainableStateMixin:
    """Shared by the SA2VP models: the training loss, and trainable-parameter access (everything outside
    ``backbone.`` trains)."""

    def loss(self, outputs, target: torch.Tensor) -> torch.Tensor:
        """``w_base * CE(logits) + w_prompt * CE(prompt_logits)`` (weights ``config.loss_weights``)."""
        logits, prompt_logits = outputs
        w_base, w_prompt = self.config.loss_weights
        return w_base * F.cross_entropy(logits, target) + w_prompt * F.cross_entropy(prompt_logits, target)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of everything SA2VP trains (prompts, adapters, head); the backbone is frozen."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the trainable parameters; every one must be present with its shape, nothing else."""
        own = dict(self.trainable_parameters())
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(f"trainable state dict mismatch: missing {missing}, unexpected {unexpected}")
        bad = [f"{n}: {tuple(state_dict[n].shape)} vs {tuple(p.shape)}" for n, p in own.items()
               if tuple(state_dict[n].shape) != tuple(p.shape)]
        if bad:
            raise ValueError(f"trainable state dict shapes differ from the model's (checkpoint vs model): {bad}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state_dict[n])

    def num_trainable(self, include_head: bool = True) -> int:
        return sum(p.numel() for n, p in self.trainable_parameters() if include_head or not n.startswith("head."))


def resolve_backbone(backbone, backbone_type: type, build, img_size, backbone_kwargs) -> tuple[nn.Module, str]:
    """``(module, timm name)`` of a backbone given as a timm model name (built with ``build(name, kwargs)``,
    no classifier) or as a ``backbone_type`` module; ``img_size`` resizes either."""
    if isinstance(backbone, str):
        kwargs = dict(backbone_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        kwargs.setdefault("num_classes", 0)
        return build(backbone, kwargs), backbone
    if backbone_kwargs:
        raise ValueError("backbone_kwargs only applies when backbone is a timm model name")
    if not isinstance(backbone, backbone_type):
        raise TypeError(f"backbone must be a timm {backbone_type.__name__} or its name, got {type(backbone).__name__}")
    if img_size is not None:
        backbone.set_input_size(img_size=img_size)
    return backbone, backbone_name(backbone)


class SA2VP(TrainableStateMixin, nn.Module):
    """SA2VP (spatially aligned-and-adapted visual prompt) over a frozen timm ViT.

    Args:
        backbone: a timm ``VisionTransformer`` or a timm model name (built with ``pretrained=False``).
            An instance is taken over: its classifier is removed and its weights are frozen.
        num_classes: classes of the trainable head.
        config: an :class:`SA2VPConfig` (default: the ``paper`` variant with the default fields).
        variant: ``"paper"`` or ``"official-acc"``, instead of (or consistent with) ``config``.
        pretrained_path: local file with the backbone's weights (timm ``.pth``/``.safetensors`` or
            original ViT ``.npz``).
        img_size: input size for the backbone (position embeddings are resampled).
        backbone_kwargs: extra ``timm.create_model`` arguments when ``backbone`` is a name.
    """

    def __init__(self, backbone, num_classes: int, config: SA2VPConfig | None = None, *, variant: str | None = None,
                 pretrained_path=None, img_size=None, backbone_kwargs: dict | None = None):
        super().__init__()
        config = _resolve_config(config, variant)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        backbone, name = resolve_backbone(backbone, VisionTransformer, build_backbone, img_size, backbone_kwargs)
        if pretrained_path is not None:
            load_backbone_weights(backbone, pretrained_path)
        _check_backbone(backbone)
        backbone.reset_classifier(0)
        backbone.requires_grad_(False)

        self.config = config
        self.num_classes = num_classes
        self.backbone = backbone
        self.backbone_name = name
        self.backbone_kwargs = describe_backbone(backbone)

        depth = len(backbone.blocks)
        attn = backbone.blocks[0].attn
        dim = backbone.embed_dim
        self.num_prefix = backbone.num_prefix_tokens
        self.prompt_grid = tuple(config.prompt_grid or backbone.patch_embed.grid_size)
        rows = self.num_prefix + self.prompt_grid[0] * self.prompt_grid[1]
        b2p, deep = config.layers(depth)
        self.b2p_layers, self.deep_layers = frozenset(b2p), frozenset(deep)
        self.cross_heads = attn.num_heads if config.cross_heads == "backbone" else config.cross_heads
        if attn.attn_dim % self.cross_heads:
            raise ValueError(
                f"cross_heads={self.cross_heads} does not divide the attention width {attn.attn_dim}"
            )
        self.cross_scale = (attn.attn_dim // self.cross_heads) ** -0.5
        self._stochastic = _is_stochastic(backbone)

        self.prompt = PromptMap(rows, config.r, dim)
        self.deep_prompts = nn.ModuleDict({str(i): DeepPrompt(rows, config.r, dim) for i in deep})
        self.adapters = nn.ModuleList(Adapter(dim, config.r) for _ in range(depth))
        self.head = nn.Linear(backbone.head_hidden_size, num_classes)
        trunc_normal_(self.head.weight, std=0.02)

    def set_backend(self, backend: str) -> "SA2VP":
        """Switch the kernel backend (``config.backend``) in place; returns the model."""
        self.config = self.config.replace(backend=backend)
        return self

    # ------------------------------------------------------------------------------------------ parts
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image tokens ``(B, N, C)`` with prefix tokens and position embedding, and the token grid."""
        bb = self.backbone
        x = bb.patch_embed(images)
        grid = (int(x.shape[1]), int(x.shape[2])) if x.ndim == 4 else tuple(bb.patch_embed.grid_size)
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(x)))
        return x, grid

    def _prompt_pos(self, grid) -> torch.Tensor | None:
        """The position embedding the image tokens get, as ``(1, N, C)`` (zeros on unembedded prefix rows)."""
        bb = self.backbone
        pos = bb.pos_embed
        if pos is None:
            return None
        if bb.dynamic_img_size:
            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=bb.patch_embed.grid_size,
                                         num_prefix_tokens=0 if bb.no_embed_class else self.num_prefix)
        if bb.no_embed_class and self.num_prefix:
            pos = torch.cat([pos.new_zeros(1, self.num_prefix, pos.shape[-1]), pos], dim=1)
        return pos

    def _prompt_tokens(self, prompt: PromptMap, grid, pos) -> torch.Tensor:
        """``Up(E)`` resampled to ``grid`` (+ ``pos``): ``(1, N, C)``."""
        if self.config.backend != "reference":
            return sa2vp_kernels.prompt_map(prompt.embed, prompt.proj.weight, prompt.proj.bias, pos, grid,
                                            num_prefix=self.num_prefix, embed_grid=self.prompt_grid,
                                            backend=self.config.backend)
        rows = prompt.embed
        if tuple(grid) != self.prompt_grid:
            T, (h, w) = self.num_prefix, self.prompt_grid
            image = rows[T:].t().reshape(1, -1, h, w)
            image = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False)
            rows = torch.cat([rows[:T], image.flatten(2)[0].t()], dim=0)
        out = prompt.proj(rows).unsqueeze(0)
        return out if pos is None else out + pos

    @staticmethod
    def _qkv(blk: Block, x: torch.Tensor):
        """``norm1`` + ``qkv`` (+ q/k norm) of a block, as three ``(B, heads, N, head_dim)`` views."""
        attn = blk.attn
        B, N, _ = x.shape
        qkv = attn.qkv(blk.norm1(x)).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def _block(self, blk: Block, x: torch.Tensor, q, k, v) -> torch.Tensor:
        """The rest of ``blk(x)`` given its ``q, k, v``: self-attention, LayerScale, drop path, MLP."""
        attn = blk.attn
        B, N, _ = x.shape
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, N, attn.attn_dim))))
        x = x + blk.drop_path1(blk.ls1(o))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _cross_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, d)`` -> ``(B, cross_heads, N, heads * d / cross_heads)`` (a view when possible)."""
        B, H, N, d = t.shape
        if H == self.cross_heads:
            return t
        return t.transpose(1, 2).reshape(B, N, self.cross_heads, H * d // self.cross_heads).transpose(1, 2)

    def _cross(self, blk: Block, h: torch.Tensor, q, k, v, grid) -> torch.Tensor:
        """The cross block up to the adapter: ``h + dropout(Wo LocalAttn(q, k, v))``."""
        cfg, attn = self.config, blk.attn
        q, k, v = self._cross_view(q), self._cross_view(k), self._cross_view(v)
        B = max(q.shape[0], k.shape[0])
        q, k, v = q.expand(B, -1, -1, -1), k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        if cfg.backend == "reference":
            a = local_cross_attention_vectorized(q, k, v, grid, cfg.window, self.num_prefix, cfg.border,
                                                 self.cross_scale)
        else:
            a = sa2vp_kernels.local_cross_attention(q, k, v, grid, window=cfg.window, num_prefix=self.num_prefix,
                                                    border=cfg.border, scale=self.cross_scale, backend=cfg.backend)
        a = a.transpose(1, 2).reshape(B, a.shape[2], attn.attn_dim)
        return h + F.dropout(attn.proj(attn.norm(a)), cfg.attn_dropout, self.training)

    def _adapt_add(self, i: int, target, message, deep=None, deep_scale=None) -> torch.Tensor:
        """``target [+ deep_scale * deep] + s * Adapter_i(message)``."""
        cfg, adapter = self.config, self.adapters[i]
        p = cfg.adapter_dropout if self.training else 0.0
        target = target.expand(message.shape[0], -1, -1)
        if deep is not None and (cfg.backend == "reference" or deep.shape[0] != 1):
            # a per-image deep prompt (stochastic backbone) is added here; the fused op takes (1, N, C) maps
            target, deep, deep_scale = target + deep_scale * deep, None, None
        if cfg.backend == "reference":
            return target + cfg.s * adapter(message, p)
        return sa2vp_kernels.prompt_add(
            target, message, cfg.s, adapter.norm.weight, adapter.norm.bias, adapter.down.weight,
            adapter.down.bias, adapter.up.weight, adapter.up.bias, deep=deep, deep_scale=deep_scale,
            dropout_p=p, eps=adapter.norm.eps, backend=cfg.backend)

    def _classify(self, t: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return self.head(bb.forward_head(bb.norm(t), pre_logits=True))

    # ---------------------------------------------------------------------------------------- forward
    def _encode(self, images: torch.Tensor, record_layer: int | None = None):
        """Run both pathways through all blocks; returns ``(X, P, message, grid)``.

        With ``record_layer`` (a P2B block) the loop stops at that block and ``message`` is the
        ``s * F`` it added to the base pathway (adapter dropout off).
        """
        bb = self.backbone
        x, grid = self._embed(images)
        B = x.shape[0]
        shared = not (self.training and self._stochastic)
        p = self._prompt_tokens(self.prompt, grid, self._prompt_pos(grid))
        if not shared:
            p = p.expand(B, -1, -1)
        p = bb.norm_pre(bb.pos_drop(p))

        for i, blk in enumerate(bb.blocks):
            qkv_x, qkv_p = self._qkv(blk, x), self._qkv(blk, p)
            if i in self.b2p_layers:
                message = self._cross(blk, p, qkv_p[0], qkv_x[1], qkv_x[2], grid)
                p_out = self._block(blk, p, *qkv_p)
                deep = deep_scale = None
                if i in self.deep_layers:
                    prompt = self.deep_prompts[str(i)]
                    d = self._prompt_tokens(prompt, grid, None)
                    if not shared:
                        d = d.expand(B, -1, -1)
                    deep, deep_scale = self._block(blk, d, *self._qkv(blk, d)), prompt.scale
                x = self._block(blk, x, *qkv_x)
                p = self._adapt_add(i, p_out, message, deep, deep_scale)
            else:
                message = self._cross(blk, x, qkv_x[0], qkv_p[1], qkv_p[2], grid)
                if i == record_layer:
                    adapter = self.adapters[i]
                    return x, p, self.config.s * adapter(message, 0.0), grid
                p = self._block(blk, p, *qkv_p)
                x = self._adapt_add(i, self._block(blk, x, *qkv_x), message)
        return x, p, None, grid

    def forward(self, images: torch.Tensor) -> SA2VPOutput:
        x, p, _, _ = self._encode(images)
        logits = self._classify(x)
        prompt_logits = self._classify(p).expand_as(logits)
        return SA2VPOutput(logits, prompt_logits)

    @torch.no_grad()
    def p2b_messages(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """``(B, H, W)``: the norm of the message ``s * F`` that P2B block ``layer`` adds to every image token."""
        depth = len(self.backbone.blocks)
        if not isinstance(layer, int) or not 0 <= layer < depth:
            raise ValueError(f"layer must be a block index in [0, {depth}), got {layer!r}")
        if layer in self.b2p_layers:
            p2b = [i for i in range(depth) if i not in self.b2p_layers]
            raise ValueError(f"block {layer} is a B2P block (it sends no message to the image); P2B blocks: {p2b}")
        _, _, message, (gh, gw) = self._encode(images, record_layer=layer)
        return message[:, self.num_prefix:].norm(dim=-1).reshape(message.shape[0], gh, gw)

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"backbone={self.backbone_name!r}, num_classes={self.num_classes}, r={cfg.r}, s={cfg.s}, "
                f"b2p={sorted(self.b2p_layers)}, deep={sorted(self.deep_layers)}, cross_heads={self.cross_heads}, "
                f"border={cfg.border!r}, prompt_grid={self.prompt_grid}, backend={cfg.backend!r}")
