"""A deliberately naive SA2VP written straight from the method's specification (test oracle).

Nothing is shared or fused: every cross block owns separate copies of its block's frozen norm1 and
q/k/v/out weights, the prompt pathway is materialised per image from the start, every block is called
as the timm module ``blk(x)``, and the local attention is the query-by-query oracle.  It takes its
parameter values from an :class:`sa2vp.SA2VP` model and reports its gradients under that model's
parameter names, so the two can be compared.  Standard ViT blocks only (no q/k norm).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sa2vp_kernels.reference import local_cross_attention_oracle
from timm.layers import resample_abs_pos_embed


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class NaiveCrossBlock(nn.Module):
    """``Cross_i(query, keyvalue)`` with its own copies of the frozen weights and its trainable adapter."""

    def __init__(self, block, adapter, *, heads, border, window, num_prefix, attn_dropout, adapter_dropout):
        super().__init__()
        attn = block.attn
        A = attn.qkv.weight.shape[0] // 3
        w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach() if attn.qkv.bias is not None else None
        self.attention_norm = copy.deepcopy(block.norm1)
        self.to_q = _linear_from(w[:A], None if b is None else b[:A])
        self.to_k = _linear_from(w[A:2 * A], None if b is None else b[A:2 * A])
        self.to_v = _linear_from(w[2 * A:], None if b is None else b[2 * A:])
        self.to_out = copy.deepcopy(attn.proj)
        for p in self.parameters():
            p.requires_grad_(False)
        self.ffn_norm = copy.deepcopy(adapter.norm)
        self.fc1 = copy.deepcopy(adapter.down)
        self.fc2 = copy.deepcopy(adapter.up)
        for p in (*self.ffn_norm.parameters(), *self.fc1.parameters(), *self.fc2.parameters()):
            p.requires_grad_(True)
        self.heads, self.border, self.window, self.num_prefix = heads, border, window, num_prefix
        self.attn_dropout, self.adapter_dropout = attn_dropout, adapter_dropout

    def _split(self, t):
        B, N, A = t.shape
        return t.reshape(B, N, self.heads, A // self.heads).transpose(1, 2)

    def forward(self, keyvalue, query, grid):
        h = query
        q = self._split(self.to_q(self.attention_norm(query)))
        k = self._split(self.to_k(self.attention_norm(keyvalue)))
        v = self._split(self.to_v(self.attention_norm(keyvalue)))
        a = local_cross_attention_oracle(q, k, v, grid, window=self.window, num_prefix=self.num_prefix,
                                         border=self.border, scale=q.shape[-1] ** -0.5)
        B, H, N, d = a.shape
        y = F.dropout(self.to_out(a.transpose(1, 2).reshape(B, N, H * d)), self.attn_dropout, self.training) + h
        y = F.dropout(F.gelu(self.fc1(self.ffn_norm(y))), self.adapter_dropout, self.training)
        return F.dropout(self.fc2(y), self.adapter_dropout, self.training)


class NaiveSA2VP(nn.Module):
    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.backbone = copy.deepcopy(model.backbone)
        depth = len(self.backbone.blocks)
        self.num_prefix = self.backbone.num_prefix_tokens
        self.prompt_grid = model.prompt_grid
        self.s = cfg.s
        self.loss_weights = cfg.loss_weights
        self.b2p = set(cfg.b2p_layers) if cfg.b2p_layers is not None else {i for i in range(depth) if i % 4 == 0}
        self.deep = set(cfg.deep_layers) if cfg.deep_layers is not None else self.b2p - {0}
        heads = self.backbone.blocks[0].attn.num_heads if cfg.cross_heads == "backbone" else cfg.cross_heads
        self.cross = nn.ModuleList(
            NaiveCrossBlock(self.backbone.blocks[i], model.adapters[i], heads=heads, border=cfg.border,
                            window=cfg.window, num_prefix=self.num_prefix, attn_dropout=cfg.attn_dropout,
                            adapter_dropout=cfg.adapter_dropout)
            for i in range(depth)
        )
        self.E0 = _param(model.prompt.embed)
        self.Up0 = copy.deepcopy(model.prompt.proj)
        self.E = nn.ParameterDict({str(i): _param(model.deep_prompts[str(i)].embed) for i in self.deep})
        self.Up = nn.ModuleDict({str(i): copy.deepcopy(model.deep_prompts[str(i)].proj) for i in self.deep})
        self.c = nn.ParameterDict({str(i): _param(model.deep_prompts[str(i)].scale) for i in self.deep})
        self.head = copy.deepcopy(model.head)

    def _resample(self, E, grid):
        T, (h, w) = self.num_prefix, self.prompt_grid
        if (h, w) == tuple(grid):
            return E
        image = E[T:].t().reshape(1, -1, h, w)
        image = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False)
        return torch.cat([E[:T], image.reshape(E.shape[1], -1).t()], dim=0)

    def _pos_embed(self, grid):
        bb = self.backbone
        pos = bb.pos_embed
        if bb.dynamic_img_size:
            pos = resample_abs_pos_embed(pos, new_size=grid, old_size=bb.patch_embed.grid_size,
                                         num_prefix_tokens=0 if bb.no_embed_class else self.num_prefix)
        if bb.no_embed_class:
            pos = torch.cat([torch.zeros_like(pos[:, :self.num_prefix]), pos], dim=1)
        return pos

    def forward(self, images):
        bb = self.backbone
        x = bb.patch_embed(images)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(bb.patch_embed.grid_size)
        X = bb._pos_embed(x)
        B = X.shape[0]
        P = (self.Up0(self._resample(self.E0, grid)) + self._pos_embed(grid)[0]).unsqueeze(0).repeat(B, 1, 1)
        for i, block in enumerate(bb.blocks):
            if i in self.b2p:
                F_i = self.cross[i](X, P, grid)
                P_new = block(P)
                if i in self.deep:
                    deep_in = self.Up[str(i)](self._resample(self.E[str(i)], grid)).unsqueeze(0).repeat(B, 1, 1)
                    P_new = P_new + self.c[str(i)] * block(deep_in)
                X_new = block(X)
                P_new = P_new + self.s * F_i
            else:
                F_i = self.cross[i](P, X, grid)
                P_new = block(P)
                X_new = block(X) + self.s * F_i
            X, P = X_new, P_new
        logits = self.head(bb.forward_head(bb.norm(X), pre_logits=True))
        prompt_logits = self.head(bb.forward_head(bb.norm(P), pre_logits=True))
        return logits, prompt_logits

    def loss(self, outputs, target):
        w0, w1 = self.loss_weights
        return w0 * F.cross_entropy(outputs[0], target) + w1 * F.cross_entropy(outputs[1], target)

    def grads_by_model_name(self) -> dict[str, torch.Tensor | None]:
        """Gradients of the trainable parameters under the SA2VP model's names."""
        g = {
            "prompt.embed": self.E0.grad,
            "prompt.proj.weight": self.Up0.weight.grad,
            "prompt.proj.bias": self.Up0.bias.grad,
            "head.weight": self.head.weight.grad,
            "head.bias": self.head.bias.grad,
        }
        for i in self.deep:
            g[f"deep_prompts.{i}.embed"] = self.E[str(i)].grad
            g[f"deep_prompts.{i}.proj.weight"] = self.Up[str(i)].weight.grad
            g[f"deep_prompts.{i}.proj.bias"] = self.Up[str(i)].bias.grad
            g[f"deep_prompts.{i}.scale"] = self.c[str(i)].grad
        for i, cross in enumerate(self.cross):
            for ours, mod in (("norm", cross.ffn_norm), ("down", cross.fc1), ("up", cross.fc2)):
                g[f"adapters.{i}.{ours}.weight"] = mod.weight.grad
                g[f"adapters.{i}.{ours}.bias"] = mod.bias.grad
        return g
