"""Eager calls of the Triton backend launch their kernels directly, not through ``wrap_triton``'s
higher-order-op dispatch (``sa2vp_kernels._dispatch.direct_launches``).

That dispatch is what tracing (torch.compile, export, fake tensors) needs; in an eager call it only
adds host time, hundreds of microseconds per launch on a GPU machine (bench/triton_host.py). Under
TRITON_INTERPRET ``wrap_triton`` hands the kernel back unchanged either way, so these tests record the
switch torch reads at every launch (``torch._library.triton.is_wrap_triton_enabled``) and check that the
results stay those of the reference.
"""
import importlib

import pytest
import torch
from torch._library.triton import is_wrap_triton_enabled
from torch.utils._python_dispatch import TorchDispatchMode

import sa2vp_kernels as sk
from sa2vp_kernels import _dispatch
from sa2vp_kernels.reference import local_cross_attention_vectorized, prompt_add_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_MODULES = ("local_attn", "prompt_add", "prompt_map")


@pytest.fixture
def launches(monkeypatch):
    """The switch's value at every launch of the Triton launchers, in order."""
    seen = []
    for name in _MODULES:
        module = importlib.import_module(f"sa2vp_kernels.triton.{name}")
        real = module.wrap_triton

        def recording(kernel, real=real):
            seen.append(is_wrap_triton_enabled())
            return real(kernel)

        monkeypatch.setattr(module, "wrap_triton", recording)
    return seen


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def test_attention_eager_forward_and_backward_launch_directly(launches):
    q, k, v = (_rand(2, 3, 13, 8, seed=i).requires_grad_(True) for i in range(3))  # 1 + 3 x 4 grid
    grad = _rand(2, 3, 13, 8, seed=9)
    out = sk.local_cross_attention(q, k, v, (3, 4), backend="triton")
    n_fwd = len(launches)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert n_fwd >= 1 and len(launches) > n_fwd
    assert launches == [False] * len(launches)
    assert is_wrap_triton_enabled()  # restored after the call

    ref_in = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = local_cross_attention_vectorized(*ref_in, (3, 4), 3, 1, "clip", 8 ** -0.5)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_in, grad)):
        torch.testing.assert_close(a, b)

    launches.clear()
    with torch.no_grad():
        torch.testing.assert_close(sk.local_cross_attention(q, k, v, (3, 4), backend="triton"), ref.detach())
    assert launches and launches == [False] * len(launches)


def test_prompt_add_eager_forward_and_backward_launch_directly(launches):
    B, N, C, r = 2, 7, 24, 3
    target, message = _rand(B, N, C, seed=0), _rand(B, N, C, seed=1)
    weights = [_rand(*s, seed=2 + i).requires_grad_(True)
               for i, s in enumerate(((C,), (C,), (r, C), (r,), (C, r), (C,)))]
    grad = _rand(B, N, C, seed=9)
    out = sk.prompt_add(target, message, 0.3, *weights, backend="triton")
    grads = torch.autograd.grad(out, weights, grad)
    assert len(launches) >= 2 and launches == [False] * len(launches)

    ref_w = [w.detach().requires_grad_(True) for w in weights]
    ref = prompt_add_reference(target, message, 0.3, *ref_w, None, None, 0.0, 1e-6, None)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_w, grad)):
        torch.testing.assert_close(a, b)


def test_prompt_map_eager_forward_and_backward_launch_directly(launches):
    embed = _rand(1 + 2 * 3, 4, seed=0).requires_grad_(True)
    weight = _rand(16, 4, seed=1).requires_grad_(True)
    bias = _rand(16, seed=2).requires_grad_(True)
    out = sk.prompt_map(embed, weight, bias, None, (4, 5), num_prefix=1, embed_grid=(2, 3), backend="triton")
    grads = torch.autograd.grad(out, (embed, weight, bias), torch.ones_like(out))
    assert len(launches) >= 2 and launches == [False] * len(launches)

    ref_in = [t.detach().requires_grad_(True) for t in (embed, weight, bias)]
    ref = sk.prompt_map(*ref_in, None, (4, 5), num_prefix=1, embed_grid=(2, 3), backend="reference")
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_in, torch.ones_like(ref))):
        torch.testing.assert_close(a, b)


def test_backward_under_a_dispatch_mode_keeps_wrap_triton(launches):
    """A backward that runs where eager_triton is false (here under a dispatch mode) leaves the switch
    alone: only calls known to be eager skip the higher-order-op dispatch."""
    q, k, v = (_rand(1, 1, 13, 8, seed=i).requires_grad_(True) for i in range(3))
    out = sk.local_cross_attention(q, k, v, (3, 4), backend="triton")
    launches.clear()
    with _PassThrough():
        assert not _dispatch.eager_triton(q)
        torch.autograd.grad(out.sum(), (q, k, v))
    assert launches and launches == [True] * len(launches)


def test_direct_launches_is_conditional():
    q = torch.zeros(2)
    with _dispatch.direct_launches(q):
        assert not is_wrap_triton_enabled()
    assert is_wrap_triton_enabled()
    with _PassThrough():
        with _dispatch.direct_launches(q):
            assert is_wrap_triton_enabled()

    class Subclass(torch.Tensor):
        pass

    with _dispatch.direct_launches(q.as_subclass(Subclass)):
        assert is_wrap_triton_enabled()
