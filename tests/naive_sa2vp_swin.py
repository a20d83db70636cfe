"""A deliberately naive SA2VP on Swin written straight from the specification (test oracle).

Nothing is shared or fused: every cross block owns separate copies of its block's frozen norm1 and
q/k/v/out weights, the prompt pathway is materialised per image from the start, every frozen block and
stage is called as the timm module, the local attention is the query-by-query oracle, and the pooling
is a plain mean over the final map.  It takes its parameter values from an :class:`sa2vp.SA2VPSwin`
model and reports its gradients under that model's parameter names, so the two can be compared.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sa2vp_kernels.reference import local_cross_attention_oracle


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


class NaiveSwinCross(nn.Module):
    """``Cross(query, keyvalue)`` of one Swin block: own copies of norm1/q/k/v/proj, no windows, no bias table."""

    def __init__(self, block, adapter, *, window, border, attn_dropout, adapter_dropout):
        super().__init__()
        attn = block.attn
        A = attn.qkv.weight.shape[0] // 3
        w = attn.qkv.weight.detach()
        b = attn.qkv.bias.detach() if attn.qkv.bias is not None else None
        self.attention_norm = copy.deepcopy(block.norm1).requires_grad_(False)
        self.to_q = _linear_from(w[:A], None if b is None else b[:A])
        self.to_k = _linear_from(w[A:2 * A], None if b is None else b[A:2 * A])
        self.to_v = _linear_from(w[2 * A:], None if b is None else b[2 * A:])
        self.to_out = copy.deepcopy(attn.proj).requires_grad_(False)
        self.ffn_norm = copy.deepcopy(adapter.norm).requires_grad_(True)
        self.fc1 = copy.deepcopy(adapter.down).requires_grad_(True)
        self.fc2 = copy.deepcopy(adapter.up).requires_grad_(True)
        self.heads, self.window, self.border = attn.num_heads, window, border
        self.attn_dropout, self.adapter_dropout = attn_dropout, adapter_dropout

    def _split(self, t):
        B, N, A = t.shape
        return t.reshape(B, N, self.heads, A // self.heads).transpose(1, 2)

    def forward(self, keyvalue, query):
        """``keyvalue`` and ``query``: ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        B, H, W, C = query.shape
        h = query.reshape(B, H * W, C)
        kv = keyvalue.reshape(B, H * W, C)
        q = self._split(self.to_q(self.attention_norm(h)))
        k = self._split(self.to_k(self.attention_norm(kv)))
        v = self._split(self.to_v(self.attention_norm(kv)))
        a = local_cross_attention_oracle(q, k, v, (H, W), window=self.window, num_prefix=0, border=self.border,
                                         scale=q.shape[-1] ** -0.5)
        a = a.transpose(1, 2).reshape(B, H * W, -1)
        y = F.dropout(self.to_out(a), self.attn_dropout, self.training) + h
        y = F.dropout(F.gelu(self.fc1(self.ffn_norm(y))), self.adapter_dropout, self.training)
        return F.dropout(self.fc2(y), self.adapter_dropout, self.training).reshape(B, H, W, C)


class NaiveSA2VPSwin(nn.Module):
    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.backbone = copy.deepcopy(model.backbone)
        self.s = cfg.s
        self.loss_weights = cfg.loss_weights
        self.prompt_grid = model.prompt_grid
        self.stages = set(cfg.stages)
        self.b2p = {}
        self.cross = nn.ModuleDict()
        for i in self.stages:
            blocks = self.backbone.layers[i].blocks
            pattern = cfg.b2p_blocks if cfg.b2p_blocks is not None else range(0, len(blocks), 6)
            self.b2p[i] = set(pattern)
            self.cross[str(i)] = nn.ModuleList(
                NaiveSwinCross(blk, model.adapters[str(i)][j], window=cfg.window, border=cfg.border,
                               attn_dropout=cfg.attn_dropout, adapter_dropout=cfg.adapter_dropout)
                for j, blk in enumerate(blocks)
            )
        self.E = nn.Parameter(model.prompt.embed.detach().clone())
        self.Up = copy.deepcopy(model.prompt.proj)
        self.head = copy.deepcopy(model.head)

    def _prompt(self, grid):
        h, w = self.prompt_grid
        E = self.E
        if (h, w) != tuple(grid):
            image = E.t().reshape(1, -1, h, w)
            E = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False).reshape(E.shape[1], -1).t()
        return self.backbone.patch_embed.norm(self.Up(E).reshape(1, grid[0], grid[1], -1))

    def forward(self, images):
        bb = self.backbone
        X = bb.patch_embed(images)
        B = X.shape[0]
        P = self._prompt(X.shape[1:3]).repeat(B, 1, 1, 1)
        for i, stage in enumerate(bb.layers):
            if i not in self.stages:
                X, P = stage(X), stage(P)
                continue
            X, P = stage.downsample(X), stage.downsample(P)
            for j, block in enumerate(stage.blocks):
                cross = self.cross[str(i)][j]
                if j in self.b2p[i]:
                    F_j = cross(X, P)
                    P_new = block(P) + self.s * F_j
                    X_new = block(X)
                else:
                    F_j = cross(P, X)
                    P_new = block(P)
                    X_new = block(X) + self.s * F_j
                X, P = X_new, P_new
        logits = self.head(bb.norm(X).mean(dim=(1, 2)))
        prompt_logits = self.head(bb.norm(P).mean(dim=(1, 2)))
        return logits, prompt_logits

    def loss(self, outputs, target):
        w0, w1 = self.loss_weights
        return w0 * F.cross_entropy(outputs[0], target) + w1 * F.cross_entropy(outputs[1], target)

    def grads_by_model_name(self) -> dict[str, torch.Tensor | None]:
        """Gradients of the trainable parameters under the SA2VPSwin model's names."""
        g = {
            "prompt.embed": self.E.grad,
            "prompt.proj.weight": self.Up.weight.grad,
            "prompt.proj.bias": self.Up.bias.grad,
            "head.weight": self.head.weight.grad,
            "head.bias": self.head.bias.grad,
        }
        for i, crosses in self.cross.items():
            for j, cross in enumerate(crosses):
                for ours, mod in (("norm", cross.ffn_norm), ("down", cross.fc1), ("up", cross.fc2)):
                    g[f"adapters.{i}.{j}.{ours}.weight"] = mod.weight.grad
                    g[f"adapters.{i}.{j}.{ours}.bias"] = mod.bias.grad
        return g
