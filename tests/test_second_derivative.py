"""The fused ops have first derivatives only: taking a second one through a kernel backend raises an
error that names the op, on every backend that has kernels (the compiled ops through PyTorch's "not
implemented" autograd kernel of their backward ops, the Triton ops through their own). Without it a
compiled backward op counted as a constant: a silently wrong zero second derivative. The pure-PyTorch
reference backend differentiates twice like any PyTorch code."""
import pytest
import torch

import sa2vp_kernels as sk
from sa2vp_kernels import _ext

BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _ext.extension_available(), reason="no compiled extension")),
    "triton",  # under TRITON_INTERPRET on a CPU (tests/conftest.py)
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaf(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)


def _attention(backend):
    q, k, v = (_leaf(1, 2, 7, 8, seed=i) for i in range(3))
    out = sk.local_cross_attention(q, k, v, (2, 3), backend=backend)
    return (out * out).sum(), q, k


def _prompt_add(backend):
    C, r = 12, 3
    t = [_leaf(2, 5, C, seed=10), _leaf(2, 5, C, seed=11)]
    w = [_leaf(C, seed=12), _leaf(C, seed=13), _leaf(r, C, seed=14), _leaf(r, seed=15), _leaf(C, r, seed=16),
         _leaf(C, seed=17)]
    out = sk.prompt_add(t[0], t[1], 0.5, *w, backend=backend)
    return (out * out).sum(), t[1], w[2]


def _prompt_map(backend):
    embed, weight = _leaf(1 + 6, 3, seed=20), _leaf(10, 3, seed=21)
    out = sk.prompt_map(embed, weight, None, None, (3, 4), embed_grid=(2, 3), backend=backend)
    return (out * out).sum(), embed, weight


OPS = {"local_cross_attention": _attention, "prompt_add": _prompt_add, "prompt_map": _prompt_map}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_second_derivative_raises(op, backend):
    loss, a, b = OPS[op](backend)
    (first,) = torch.autograd.grad(loss, a, create_graph=True)
    ref_loss, ref_a, _ = OPS[op]("reference")  # (the same seeded inputs)
    torch.testing.assert_close(first.detach(), torch.autograd.grad(ref_loss, ref_a)[0])  # the first is right
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula|no second derivative"):
        torch.autograd.grad(first.sum(), b)


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_differentiates_twice(op):
    loss, a, b = OPS[op]("reference")
    (first,) = torch.autograd.grad(loss, a, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), b)
    assert second.abs().max() > 0
