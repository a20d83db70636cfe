"""Configuration of the SA2VP model: one dataclass, two named variants of the authors' code.

* ``paper`` (their reference ``vit_tinypara.py``): clipped 3 x 3 border, the cross attention uses the
  backbone's heads (12 x 64 on ViT-B), scale ``head_dim ** -0.5``.
* ``official-acc`` (their accelerated ``vit_tinypara_acc.py``): zero-padded border, one head of width
  ``C``, scale ``C ** -0.5``.

Everything else (r, s, layer sets, dropout, loss weights) is shared.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from sa2vp_kernels import BACKENDS

__all__ = ["SA2VPConfig", "VARIANTS"]

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": dict(border="clip", cross_heads="backbone"),
    "official-acc": dict(border="zero", cross_heads=1),
}


def _layer_tuple(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be None or a collection of layer indices, got {value!r}")
    out = []
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must hold non-negative int layer indices, got {value!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} holds a layer index twice: {value!r}")
    return tuple(sorted(out))


def _check_float(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a float, got {value!r}")
    return float(value)


def _check_window(window) -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    return window


_Config = TypeVar("_Config", bound="_ConfigMixin")


class _ConfigMixin:
    """What :class:`SA2VPConfig` and ``sa2vp.swin.SA2VPSwinConfig`` share: the checks of their common
    fields and the (de)serialisation to a dict or JSON.  The subclasses are dataclasses; ``to_dict``
    writes the fields named in ``_LIST_FIELDS`` (tuples or None) as lists, so the dict is JSON-ready."""

    _LIST_FIELDS: tuple[str, ...] = ()

    def _check_common_fields(self) -> None:
        """Checks and normalises ``border``, ``prompt_grid``, the dropouts, ``loss_weights`` and ``backend``."""
        if self.border not in ("clip", "zero"):
            raise ValueError(f"border must be 'clip' or 'zero', got {self.border!r}")
        if self.prompt_grid is not None:
            grid = tuple(self.prompt_grid)
            if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
                raise ValueError(f"prompt_grid must be None or a pair (h, w) of positive ints, got {self.prompt_grid!r}")
            self.prompt_grid = grid
        for name in ("adapter_dropout", "attn_dropout"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")
            setattr(self, name, float(p))
        weights = tuple(self.loss_weights)
        if len(weights) != 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise ValueError(f"loss_weights must be a pair of floats (base, prompt), got {self.loss_weights!r}")
        self.loss_weights = (float(weights[0]), float(weights[1]))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def replace(self: _Config, **changes) -> _Config:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in self._LIST_FIELDS:
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls: type[_Config], d: dict[str, Any]) -> _Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[_Config], text: str) -> _Config:
        return cls.from_dict(json.loads(text))


@dataclass
class SA2VPConfig(_ConfigMixin):
    """Hyper-parameters of SA2VP on a ViT backbone.

    Attributes:
        r: inter-dim, the width of the prompt maps and of the adapter bottleneck.
        s: inter-weight, the scale of the adapted cross-pathway message.
        b2p_layers: blocks where the prompt gathers from the base pathway (B2P); the other blocks are
            P2B (the prompt adapts the base).  None: ``{i : i % 4 == 0}`` ({0, 4, 8} for depth 12).
        deep_layers: B2P blocks that add a deep prompt ``c_j * Block_i(Up_j(E_j))``.  None: the B2P
            blocks without block 0.
        window: odd side of the cross-attention neighbourhood.
        cross_heads: ``"backbone"`` (the backbone's heads) or the number of heads the block's q/k/v are
            split into for the cross attention (``1``: one head of width C).
        border: ``"clip"`` (out-of-grid neighbours dropped) or ``"zero"`` (score 0, value 0).
        prompt_grid: ``(h, w)`` grid of the learned prompt maps; None: the backbone's token grid.  Maps on
            another grid are resampled bilinearly to the token grid of every input.
        adapter_dropout: dropout inside the adapter (after GELU and after the up projection).
        attn_dropout: dropout on the cross-attention output (after the output projection, before the
            residual), as in the authors' cross block.
        loss_weights: weights of the cross-entropy of the base logits and of the prompt logits.
        backend: kernel backend, one of ``sa2vp_kernels.BACKENDS``; ``"reference"`` is the unfused
            pure-PyTorch composition.
    """

    r: int = 16
    s: float = 0.1
    b2p_layers: tuple[int, ...] | None = None
    deep_layers: tuple[int, ...] | None = None
    window: int = 3
    cross_heads: str | int = "backbone"
    border: str = "clip"
    prompt_grid: tuple[int, int] | None = None
    adapter_dropout: float = 0.1
    attn_dropout: float = 0.1
    loss_weights: tuple[float, float] = (0.8, 0.2)
    backend: str = "auto"

    _LIST_FIELDS = ("b2p_layers", "deep_layers", "prompt_grid", "loss_weights")

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        self.s = _check_float("s", self.s)
        self.b2p_layers = _layer_tuple("b2p_layers", self.b2p_layers)
        self.deep_layers = _layer_tuple("deep_layers", self.deep_layers)
        _check_window(self.window)
        if self.cross_heads != "backbone" and (
            not isinstance(self.cross_heads, int) or isinstance(self.cross_heads, bool) or self.cross_heads < 1
        ):
            raise ValueError(f"cross_heads must be 'backbone' or a positive int, got {self.cross_heads!r}")
        self._check_common_fields()

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "SA2VPConfig":
        """The named variant (``"paper"`` or ``"official-acc"``) with any field overridden."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {name!r}")
        return cls(**{**VARIANTS[name], **overrides})

    def variant(self) -> str | None:
        """The name of the variant whose border and heads this config uses, or None."""
        for name, fixed in VARIANTS.items():
            if all(getattr(self, k) == v for k, v in fixed.items()):
                return name
        return None

    def layers(self, depth: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(b2p, deep)`` layer indices for a backbone of ``depth`` blocks, validated."""
        b2p = self.b2p_layers if self.b2p_layers is not None else tuple(i for i in range(depth) if i % 4 == 0)
        deep = self.deep_layers if self.deep_layers is not None else tuple(i for i in b2p if i != 0)
        for name, layers in (("b2p_layers", b2p), ("deep_layers", deep)):
            bad = [i for i in layers if i >= depth]
            if bad:
                raise ValueError(f"{name} {layers} holds blocks {bad} beyond the backbone's depth {depth}")
        outside = sorted(set(deep) - set(b2p))
        if outside:
            raise ValueError(f"deep_layers must be B2P layers; {outside} are not in b2p_layers {b2p}")
        return b2p, deep
