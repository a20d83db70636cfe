"""Variants of the CUDA kernels selected by environment variables (SA2VP_CUDA_PROMPT_ADD_STAGED,
SA2VP_CUDA_ATTN_TILED), on a GPU: each must give the same bits
as the default kernel (same sums in the same order); SA2VP_CUDA_PROMPT_ADD_FINALIZE (the same sums in
another order) the same values to rounding. The CPU emulator runs the same comparisons
(tests/test_cuda_emulated.py); these check the compiled kernels on the hardware."""
import pytest
import torch

import sa2vp_kernels  # noqa: F401  (registers torch.ops.sa2vp_kernels)
from sa2vp_kernels import _ext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _needs_cuda_kernels():
    if not _ext.extension_available() or not _ext.has_kernel("prompt_add_fwd", "CUDA"):
        pytest.skip("sa2vp_kernels._C was built without CUDA kernels")


@pytest.mark.parametrize("B,N,C,r,dtype,p,deep", [
    (64, 197, 768, 16, torch.bfloat16, 0.1, True),   # the benchmark shape: many passes of the row loop
    (3, 50, 40, 3, torch.float32, 0.0, False),
    (2, 33, 96, 8, torch.float16, 0.3, True),
    (5, 7, 33, 16, torch.float64, 0.2, False),       # odd C: scalar loads
], ids=lambda v: str(v).replace("torch.", ""))
def test_prompt_add_staged_forward_is_bitwise_the_default(monkeypatch, B, N, C, r, dtype, p, deep):
    _needs_cuda_kernels()
    g = torch.Generator(device="cuda").manual_seed(5)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dtype)

    args = (rn(B, N, C), rn(B, N, C), 1 + rn(C, scale=0.1), rn(C, scale=0.1), rn(r, C, scale=C ** -0.5),
            rn(r, scale=0.1), rn(C, r, scale=r ** -0.5), rn(C, scale=0.1),
            rn(1, N, C) if deep else None, rn(C) if deep else None)
    results = []
    for staged in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_PROMPT_ADD_STAGED", staged)
        results.append(torch.ops.sa2vp_kernels.prompt_add_fwd(*args, 0.7, p, 1e-6, 123))
    torch.cuda.synchronize()
    for a, b in zip(*results):
        assert a.isfinite().all() and torch.equal(a, b)


@pytest.mark.parametrize("B,H,grid,P,D,window,zero,dtype", [
    (64, 1, (14, 14), 1, 768, 3, False, torch.bfloat16),   # the benchmark shapes
    (64, 12, (14, 14), 1, 64, 3, True, torch.bfloat16),
    (2, 3, (17, 16), 2, 40, 5, False, torch.float32),       # several tiles per grid row and column
    (1, 2, (2, 3), 0, 24, 9, True, torch.float16),          # a window larger than the grid
    (2, 1, (5, 7), 3, 17, 7, False, torch.float64),         # head dim padded to the vector width
], ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_local_attention_tiled_forward_is_bitwise_the_default(monkeypatch, B, H, grid, P, D, window, zero, dtype):
    _needs_cuda_kernels()
    g = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(B, H, P + grid[0] * grid[1], D, generator=g, device="cuda").to(dtype) for _ in range(3))
    results = []
    for tiled in ("0", "1"):
        monkeypatch.setenv("SA2VP_CUDA_ATTN_TILED", tiled)
        results.append(torch.ops.sa2vp_kernels.local_attn_fwd(q, k, v, grid[0], grid[1], window, P, zero, D ** -0.5))
    torch.cuda.synchronize()
    for a, b in zip(*results):
        assert a.isfinite().all() and torch.equal(a, b)


@pytest.mark.parametrize("B,N,C,r,dtype,p", [
    (64, 197, 768, 16, torch.bfloat16, 0.1),   # the benchmark shape: 128 token splits
    (3, 50, 40, 3, torch.float32, 0.0),
    (2, 33, 1024, 64, torch.float32, 0.3),     # r = 64: two passes of the columns kernel
    (5, 7, 33, 130, torch.float64, 0.2),       # r past the finalize kernel's lanes: ATen ops either way
], ids=lambda v: str(v).replace("torch.", ""))
def test_prompt_add_finalize_kernel_matches_aten_sums(monkeypatch, B, N, C, r, dtype, p):
    """SA2VP_CUDA_PROMPT_ADD_FINALIZE: the parameter gradients from one kernel (default) or from ATen ops
    on the same partials; the same sums in another order."""
    _needs_cuda_kernels()
    g = torch.Generator(device="cuda").manual_seed(6)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dtype)

    target, message = rn(B, N, C), rn(B, N, C)
    weights = (1 + rn(C, scale=0.1), rn(C, scale=0.1), rn(r, C, scale=C ** -0.5), rn(r, scale=0.1),
               rn(C, r, scale=r ** -0.5), rn(C, scale=0.1))
    out, mean, rstd, z = torch.ops.sa2vp_kernels.prompt_add_fwd(target, message, *weights, None, None, 0.5, p,
                                                                1e-6, 9)
    go = rn(B, N, C)
    results = []
    for fin in ("1", "0"):
        monkeypatch.setenv("SA2VP_CUDA_PROMPT_ADD_FINALIZE", fin)
        results.append(torch.ops.sa2vp_kernels.prompt_add_bwd(go, message, mean, rstd, z, weights[0], weights[1],
                                                              weights[2], weights[4], 0.5, p, 9))
    assert torch.equal(results[0][0], results[1][0])  # grad_message: the same kernel
    for i, (a, b) in enumerate(zip(results[0][1:], results[1][1:])):
        assert a.dtype == dtype and a.shape == b.shape and torch.isfinite(a).all()
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * b.double().abs().max().item(),
                                   msg=lambda m: f"parameter gradient {i}: {m}")
