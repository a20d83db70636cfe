"""prompt_add on every backend against the unfused PyTorch composition."""
import pytest
import torch
from torch import nn

import sa2vp_kernels as sk
from sa2vp_kernels import _ext
from sa2vp_kernels.reference import prompt_add as ref
from sa2vp_kernels.reference import prompt_add_reference

CPU_BACKENDS = ["reference", "cpu", "triton"]
GPU_BACKENDS = ["cuda", "triton"]
NAMES = ["target", "message", "norm_weight", "norm_bias", "down_weight", "down_bias", "up_weight", "up_bias",
         "deep", "deep_scale"]


def _inputs(B, N, C, r, *, deep=True, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    """Inputs on realistic scales: message rows with an offset and spread, weights like trained adapters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean)

    t = {
        "target": rnd(B, N, C),
        "message": rnd(B, N, C, std=2.0) + rnd(B, N, 1, std=0.5, mean=0.3),
        "norm_weight": rnd(C, std=0.2, mean=1.0),
        "norm_bias": rnd(C, std=0.1),
        "down_weight": rnd(r, C, std=C ** -0.5),
        "down_bias": rnd(r, std=0.1),
        "up_weight": rnd(C, r, std=r ** -0.5),
        "up_bias": rnd(C, std=0.1),
        "deep": rnd(1, N, C) if deep else None,
        "deep_scale": rnd(C, std=0.5) if deep else None,
    }
    return {k: None if v is None else v.to(device=device, dtype=dtype).requires_grad_(requires_grad)
            for k, v in t.items()}


def _call(fn, t, scale, **kw):
    return fn(t["target"], t["message"], scale, t["norm_weight"], t["norm_bias"], t["down_weight"],
              t["down_bias"], t["up_weight"], t["up_bias"], deep=t["deep"], deep_scale=t["deep_scale"], **kw)


def _reference(t, scale, dropout_p=0.0, seed=None, eps=1e-6):
    return prompt_add_reference(t["target"], t["message"], scale, t["norm_weight"], t["norm_bias"],
                                t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["deep"],
                                t["deep_scale"], dropout_p, eps, seed)


def _grads(out, t, grad_out):
    names = [k for k in NAMES if t[k] is not None]
    grads = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    return dict(zip(names, grads))


# ---- the dropout hash ---------------------------------------------------------------------------


def _hash_by_hand(seed, stream, row, col):
    m32 = 0xFFFFFFFF

    def fmix(x):
        x ^= x >> 16
        x = (x * 0x85EBCA6B) % 2**32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) % 2**32
        return x ^ (x >> 16)

    key = fmix(fmix((seed >> 32) ^ (stream * 0x9E3779B9 % 2**32)) ^ (seed & m32))
    return fmix(fmix(fmix(row) ^ key) ^ (col * 0x9E3779B9 % 2**32))


def test_fmix32_known_values():
    # murmur3's finaliser: 0 is a fixed point, and fmix32(1) is a published constant of the mixer.
    assert ref.fmix32(0) == 0
    assert ref.fmix32(1) == 0x514E28B7


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 17, 2**63 - 1])
def test_hash_tensor_matches_scalar_definition(seed):
    u = ref.dropout_hash(37, 29, seed, ref.OUTPUT_STREAM)
    for row, col in [(0, 0), (0, 28), (36, 0), (17, 11), (36, 28)]:
        assert u[row, col].item() == _hash_by_hand(seed, ref.OUTPUT_STREAM, row, col)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_statistics(p):
    rows, cols = 2048, 768
    keep = ref.dropout_keep_mask(rows, cols, 7, ref.OUTPUT_STREAM, p)
    n = rows * cols
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - keep.double().mean().item()) - p) < 5 * sigma
    # no structure along rows or columns: per-row and per-column drop rates spread like binomials
    per_col = 1 - keep.double().mean(0)
    per_row = 1 - keep.double().mean(1)
    assert per_col.std().item() < 1.5 * (p * (1 - p) / rows) ** 0.5
    assert per_row.std().item() < 1.5 * (p * (1 - p) / cols) ** 0.5
    # neighbours are uncorrelated
    k = keep.double() - keep.double().mean()
    corr_c = (k[:, 1:] * k[:, :-1]).mean() / k.var()
    corr_r = (k[1:] * k[:-1]).mean() / k.var()
    assert abs(corr_c.item()) < 0.01 and abs(corr_r.item()) < 0.01


def test_streams_and_seeds_give_different_masks():
    a = ref.dropout_keep_mask(64, 64, 3, ref.HIDDEN_STREAM, 0.5)
    b = ref.dropout_keep_mask(64, 64, 3, ref.OUTPUT_STREAM, 0.5)
    c = ref.dropout_keep_mask(64, 64, 4, ref.HIDDEN_STREAM, 0.5)
    assert (a != b).double().mean() > 0.4 and (a != c).double().mean() > 0.4
    assert torch.equal(a, ref.dropout_keep_mask(64, 64, 3, ref.HIDDEN_STREAM, 0.5))


# ---- forward and backward against the reference ------------------------------------------------

SHAPES = [(1, 3, 24, 3), (3, 7, 40, 8), (2, 7, 24, 8), (2, 5, 40, 3)]


def _shape_id(s):
    return "B{}-N{}-C{}-r{}".format(*s)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_reference_float64(backend, shape, deep, dropout_p):
    t = _inputs(*shape, deep=deep, requires_grad=True, seed=1)
    out = _call(sk.prompt_add, t, 0.7, dropout_p=dropout_p, seed=99, backend=backend)
    expect = _reference(t, 0.7, dropout_p, seed=99)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    got, want = _grads(out, t, go), _grads(expect, t, go)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-11, atol=1e-11, msg=name)


def test_reference_by_hand():
    # one token, C = 2, r = 1: every step written out.
    C = 2
    x = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.5, -0.5]]], dtype=torch.float64)
    xhat = torch.tensor([-1.0, 1.0], dtype=torch.float64) / (1.0 + 1e-6) ** 0.5  # var = 1
    y = xhat * torch.tensor([2.0, 1.0], dtype=torch.float64) + torch.tensor([0.0, 1.0], dtype=torch.float64)
    zval = (y * torch.tensor([0.5, -0.25], dtype=torch.float64)).sum() + 0.1
    h = zval * 0.5 * (1 + torch.erf(zval / 2 ** 0.5))
    u = h * torch.tensor([1.0, -2.0], dtype=torch.float64) + torch.tensor([0.0, 0.3], dtype=torch.float64)
    expect = t + 0.25 * u
    out = prompt_add_reference(t, x, 0.25, torch.tensor([2.0, 1.0], dtype=torch.float64),
                               torch.tensor([0.0, 1.0], dtype=torch.float64),
                               torch.tensor([[0.5, -0.25]], dtype=torch.float64),
                               torch.tensor([0.1], dtype=torch.float64),
                               torch.tensor([[1.0], [-2.0]], dtype=torch.float64),
                               torch.tensor([0.0, 0.3], dtype=torch.float64))
    assert out.shape == (1, 1, C)
    torch.testing.assert_close(out, expect.view(1, 1, C), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_shape_id)
def test_gradcheck(backend, shape, deep):
    t = _inputs(*shape, deep=deep, requires_grad=True, seed=2)
    names = [k for k in NAMES if t[k] is not None]

    def fn(*args):
        d = dict(zip(names, args))
        d.setdefault("deep", None)
        d.setdefault("deep_scale", None)
        return _call(sk.prompt_add, d, 0.6, backend=backend)

    # the full Jacobian for the smallest shape, random projections of it elsewhere
    assert torch.autograd.gradcheck(fn, [t[k] for k in names], fast_mode=shape != SHAPES[0] or backend == "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_with_dropout(backend):
    # a fixed seed makes the function deterministic: the backward must use the forward's masks.
    t = _inputs(2, 5, 24, 8, deep=True, requires_grad=True, seed=3)
    names = list(NAMES)

    def fn(*args):
        return _call(sk.prompt_add, dict(zip(names, args)), 1.3, dropout_p=0.4, seed=2024, backend=backend)

    assert torch.autograd.gradcheck(fn, [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_seed_behaviour(backend):
    t = _inputs(2, 9, 40, 8, seed=4)
    a = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, seed=11, backend=backend)
    b = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, seed=11, backend=backend)
    c = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, seed=12, backend=backend)
    assert torch.equal(a, b)
    assert (a != c).double().mean() > 0.3
    torch.manual_seed(5)
    d = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, backend=backend)
    torch.manual_seed(5)
    e = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, backend=backend)
    f = _call(sk.prompt_add, t, 1.0, dropout_p=0.5, backend=backend)
    assert torch.equal(d, e) and not torch.equal(e, f)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_rate_and_scaling(backend):
    # up = identity-like map from a constant hidden: every output element is either 0 or scaled by 1/(1-p).
    B, N, C, r, p = 2, 64, 40, 8, 0.25
    t = _inputs(B, N, C, r, deep=False, seed=6)
    t["target"] = torch.zeros_like(t["target"])
    t["up_weight"] = torch.zeros_like(t["up_weight"])
    t["up_bias"] = torch.ones_like(t["up_bias"])
    out = _call(sk.prompt_add, t, 1.0, dropout_p=p, seed=8, backend=backend)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    n = out.numel()
    assert abs((1 - kept.double().mean().item()) - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_p_zero_needs_no_seed_and_is_deterministic():
    t = _inputs(2, 5, 24, 3, seed=7)
    a = _call(sk.prompt_add, t, 0.5, backend="reference")
    b = _call(sk.prompt_add, t, 0.5, backend="reference", seed=123)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_inputs_and_expanded_grad(backend):
    B, N, C, r = 2, 7, 40, 8
    t = _inputs(B, N, C, r, seed=9)
    big_t = torch.randn(N + 2, B, C + 8, dtype=torch.float64)
    big_m = torch.randn(B, N + 3, C, dtype=torch.float64)
    t["target"] = big_t[1:N + 1, :, 3:C + 3].transpose(0, 1).requires_grad_(False)
    t["message"] = big_m[:, 2:].clone()[:, :N].requires_grad_(True)
    m_view = big_m[:, 3:].requires_grad_(False)
    t2 = dict(t, message=m_view)
    for d in (t, t2):
        out = _call(sk.prompt_add, d, 0.9, dropout_p=0.2, seed=5, backend=backend)
        torch.testing.assert_close(out, _reference(d, 0.9, 0.2, seed=5), rtol=1e-12, atol=1e-12)
    # out.sum() backpropagates an expanded (stride 0) gradient
    out = _call(sk.prompt_add, t, 0.9, dropout_p=0.2, seed=5, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), [t["message"]])
    (g_ref,) = torch.autograd.grad(_reference(t, 0.9, 0.2, seed=5).sum(), [t["message"]])
    torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_is_deterministic(backend):
    t = _inputs(3, 37, 40, 8, requires_grad=True, dtype=torch.float32, seed=10)
    go = torch.randn(3, 37, 40)
    runs = []
    for _ in range(2):
        out = _call(sk.prompt_add, t, 0.4, dropout_p=0.1, seed=3, backend=backend)
        runs.append(_grads(out, t, go))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_only_some_inputs_require_grad():
    t = _inputs(2, 5, 24, 3, seed=11)
    t["up_weight"].requires_grad_(True)
    t["deep_scale"].requires_grad_(True)
    out = _call(sk.prompt_add, t, 0.5, backend="cpu")
    gw, gs = torch.autograd.grad(out.sum(), [t["up_weight"], t["deep_scale"]])
    wr = t["up_weight"].detach().requires_grad_(True)
    sr = t["deep_scale"].detach().requires_grad_(True)
    out_ref = _reference(dict(t, up_weight=wr, deep_scale=sr), 0.5)
    gw_ref, gs_ref = torch.autograd.grad(out_ref.sum(), [wr, sr])
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gs, gs_ref)


# ---- against the unfused nn composition, ViT-B sizes ----------------------------------------------


class _Unfused(nn.Module):
    def __init__(self, C, r, p):
        super().__init__()
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self.down = nn.Linear(C, r)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(p)
        self.up = nn.Linear(r, C)
        self.drop2 = nn.Dropout(p)

    def forward(self, target, message, scale, deep, deep_scale):
        return target + scale * self.drop2(self.up(self.drop1(self.act(self.down(self.norm(message)))))) + \
            deep_scale * deep


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matches_unfused_nn_composition_vit_b(backend):
    B, N, C, r = 4, 197, 768, 16
    torch.manual_seed(12)
    mod = _Unfused(C, r, 0.0)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    target = torch.randn(B, N, C, requires_grad=True)
    message = (torch.randn(B, N, C) * 3 + 0.5).requires_grad_(True)
    deep = torch.randn(1, N, C, requires_grad=True)
    deep_scale = (torch.randn(C) * 0.02).requires_grad_(True)
    expect = mod(target, message, 0.1, deep, deep_scale)
    out = sk.prompt_add(target, message, 0.1, mod.norm.weight, mod.norm.bias, mod.down.weight, mod.down.bias,
                        mod.up.weight, mod.up.bias, deep=deep, deep_scale=deep_scale, backend=backend)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    leaves = [target, message, deep, deep_scale, *mod.parameters()]
    want = torch.autograd.grad(expect, leaves, go)
    got = torch.autograd.grad(out, leaves, go)
    for w, g in zip(want, got):
        scale_ = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(1.0, scale_))


# ---- bad input -----------------------------------------------------------------------------------


def _bad(**changes):
    t = _inputs(2, 5, 24, 3, dtype=torch.float32, seed=13)
    kw = {"scale": 0.5, "dropout_p": 0.0, "backend": "reference", "seed": None, "eps": 1e-6}
    for k, v in changes.items():
        (kw if k in kw else t)[k] = v
    scale = kw.pop("scale")
    return t, scale, kw


BAD = [
    ({"message": torch.randn(2, 5, 25)}, ValueError, "same shape"),
    ({"target": torch.randn(2, 5)}, ValueError, "target must be a 3-D"),
    ({"norm_weight": torch.randn(23)}, ValueError, "norm_weight"),
    ({"down_weight": torch.randn(3, 23)}, ValueError, "down_weight"),
    ({"down_bias": torch.randn(4)}, ValueError, "down_bias"),
    ({"up_weight": torch.randn(24, 4)}, ValueError, "inner dimension 4"),
    ({"up_bias": torch.randn(3)}, ValueError, "up_bias"),
    ({"deep": torch.randn(2, 5, 24)}, ValueError, "deep must have shape"),
    ({"deep_scale": None}, ValueError, "together"),
    ({"deep_scale": torch.randn(5)}, ValueError, "deep_scale must have shape"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"message": torch.ones(2, 5, 24, dtype=torch.int64)}, TypeError, "floating-point"),
    ({"up_weight": torch.randn(24, 3, dtype=torch.float64)}, TypeError, "dtype"),
    ({"target": torch.randn(2, 5, 24, dtype=torch.float16)}, TypeError, "dtype"),
    ({"message": torch.randn(2, 5, 24, dtype=torch.bfloat16),
      "target": torch.randn(2, 5, 24, dtype=torch.bfloat16)}, TypeError, "supported dtypes"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"scale": "big"}, TypeError, "scale"),
    ({"scale": torch.tensor(1.0)}, TypeError, "scale"),
]


@pytest.mark.parametrize("changes,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(changes, exc, match):
    t, scale, kw = _bad(**changes)
    with pytest.raises(exc, match=match):
        _call(sk.prompt_add, t, scale, **kw)


def test_bad_device():
    t, scale, kw = _bad(deep=torch.randn(1, 5, 24, device="meta"))
    with pytest.raises(ValueError, match="device"):
        _call(sk.prompt_add, t, scale, **kw)


@pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="compiled CPU kernels not built")
def test_cpu_backend_rejects_cuda_only_requests():
    t, scale, kw = _bad(backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        _call(sk.prompt_add, t, scale, **kw)


@pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="compiled CPU kernels not built")
def test_compiled_op_checks_its_arguments():
    t = _inputs(2, 5, 24, 3, dtype=torch.float32, seed=14)
    with pytest.raises(RuntimeError, match="up_weight must be"):
        torch.ops.sa2vp_kernels.prompt_add_fwd(t["target"], t["message"], t["norm_weight"], t["norm_bias"],
                                               t["down_weight"], t["down_bias"], torch.randn(24, 4),
                                               t["up_bias"], None, None, 1.0, 0.0, 1e-6, 0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.sa2vp_kernels.prompt_add_fwd(t["target"], t["message"], t["norm_weight"], t["norm_bias"],
                                               t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"],
                                               None, None, 1.0, 1.5, 1e-6, 0)


# ---- registration: opcheck and torch.compile -----------------------------------------------------


def _op_args(deep, p, device="cpu", requires_grad=False):
    t = _inputs(2, 5, 24, 3, deep=deep, seed=15, device=device, requires_grad=requires_grad)
    return (t["target"], t["message"], t["norm_weight"], t["norm_bias"], t["down_weight"], t["down_bias"],
            t["up_weight"], t["up_bias"], t["deep"], t["deep_scale"], 0.8, p, 1e-6, 77)


# What opcheck runs on the Triton ops: everything but test_aot_dispatch_dynamic, whose dynamic-shape
# trace of the user Triton kernels spent over a minute in sympy (H200, torch 2.11, Triton 3.6: past the
# 60 s pytest-timeout). The C++ ops keep the full opcheck.
TRITON_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def _opcheck(fwd, bwd, deep, p, device="cpu", test_utils=None, bwd_takes_down_bias=False):
    kw = {} if test_utils is None else {"test_utils": test_utils}
    args = _op_args(deep, p, device=device)
    torch.library.opcheck(fwd, args, **kw)
    torch.library.opcheck(fwd, _op_args(deep, p, device=device, requires_grad=True), **kw)
    out, mean, rstd, z = fwd(*args)
    go = torch.randn_like(out)
    weights = (args[4], args[5], args[6]) if bwd_takes_down_bias else (args[4], args[6])  # the Triton op's schema
    torch.library.opcheck(bwd, (go, args[1], mean, rstd, z, args[2], args[3], *weights, 0.8, p, 77), **kw)


@pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="compiled CPU kernels not built")
@pytest.mark.parametrize("deep,p", [(False, 0.0), (True, 0.3)])
def test_opcheck_cpu(deep, p):
    _opcheck(torch.ops.sa2vp_kernels.prompt_add_fwd.default, torch.ops.sa2vp_kernels.prompt_add_bwd.default,
             deep, p)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("deep,p", [(False, 0.0), (True, 0.3)])
def test_opcheck_gpu(backend, deep, p):
    # (the Triton ops cannot run on fake tensors under the interpreter, so they are checked on GPU)
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.sa2vp_kernels, "prompt_add_fwd" + suffix).default
    bwd = getattr(torch.ops.sa2vp_kernels, "prompt_add_bwd" + suffix).default
    _opcheck(fwd, bwd, deep, p, device="cuda", test_utils=TRITON_OPCHECK_UTILS if backend == "triton" else None,
             bwd_takes_down_bias=backend == "triton")


@pytest.mark.skipif(not _ext.has_kernel("prompt_add_fwd", "CPU"), reason="compiled CPU kernels not built")
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(p):
    t = _inputs(2, 5, 24, 3, dtype=torch.float32, seed=16, requires_grad=True)

    def fn(target, message, nw, nb, dw, db, uw, ub, deep, ds):
        out = sk.prompt_add(target, message, 0.5, nw, nb, dw, db, uw, ub, deep=deep, deep_scale=ds,
                            dropout_p=p, seed=21, backend="cpu")
        return (out * out).sum()

    args = [t[k] for k in NAMES]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    expect = fn(*args)
    torch.testing.assert_close(loss, expect)
    g = torch.autograd.grad(loss, args)
    g_ref = torch.autograd.grad(expect, args)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


# ---- GPU: every backend in every dtype against float64, bounded by PyTorch's own error ------------


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(4, 197, 768, 16), (3, 37, 40, 3), (2, 50, 1024, 64)], ids=_shape_id)
def test_gpu_against_float64(backend, dtype, dropout_p, shape):
    t64 = _inputs(*shape, device="cuda", requires_grad=True, seed=17)
    t = {k: None if v is None else v.detach().to(dtype).requires_grad_(True) for k, v in t64.items()}
    # the exact answer for the rounded inputs, and what plain PyTorch gets in this dtype
    t_ex = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in t.items()}
    exact = _reference(t_ex, 0.1, dropout_p, seed=31)
    plain = _reference(t, 0.1, dropout_p, seed=31)
    out = _call(sk.prompt_add, t, 0.1, dropout_p=dropout_p, seed=31, backend=backend)
    assert out.dtype == dtype
    tiny = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert _err(out, exact) <= 2 * _err(plain, exact) + tiny
    go = torch.randn(shape[:3], device="cuda", dtype=torch.float64)
    g_ex = _grads(exact, t_ex, go)
    g_plain = _grads(plain, t, go.to(dtype))
    g = _grads(out, t, go.to(dtype))
    for name in g_ex:
        ref_scale = g_ex[name].abs().max().item()
        assert g[name].dtype == dtype
        assert _err(g[name], g_ex[name]) <= 2 * _err(g_plain[name], g_ex[name]) + tiny * ref_scale, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_identical_masks(dtype):
    t = _inputs(3, 197, 768, 16, deep=False, device="cuda", dtype=dtype, seed=18)
    t["target"] = torch.zeros_like(t["target"])
    outs = [_call(sk.prompt_add, t, 1.0, dropout_p=0.1, seed=44, backend=b) for b in ("cuda", "triton", "reference")]
    zero = [o == 0 for o in outs]
    assert torch.equal(zero[0], zero[2]) and torch.equal(zero[1], zero[2])


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    t = _inputs(8, 197, 768, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True, seed=19)
    go = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16)
    for backend in GPU_BACKENDS:
        runs = [_grads(_call(sk.prompt_add, t, 0.1, dropout_p=0.1, seed=1, backend=backend), t, go)
                for _ in range(2)]
        for name in runs[0]:
            assert torch.equal(runs[0][name], runs[1][name]), (backend, name)


# ---- edge cases for the first run of the CUDA kernels ---------------------------------------------
#
# Every case on the compiled CPU kernels (run everywhere: they prove the test itself) and on the CUDA
# and Triton kernels (GPU only), forward and every gradient against the float64 reference, bounded by
# plain PyTorch's own error in the same dtype (as test_gpu_against_float64).

EDGE_BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("triton", marks=pytest.mark.gpu)]
EDGE_CPU_DTYPES = (torch.float32, torch.float64)  # the only dtypes of the CPU backend
EDGE_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Slack on top of twice plain PyTorch's error (absolute on the output, relative to the largest
# entry on gradients). Plain PyTorch in float64 *is* the exact answer, hence a fixed slack there.
EDGE_TINY = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _laid_out(x, layout):
    """A copy of the (B, N, C) tensor ``x`` as a view with last-dim stride 1 in the given layout.

    The padding around the view is NaN: a kernel that reads outside the view poisons its result.
    """
    B, N, C = x.shape

    def nans(*shape):
        return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)

    if layout == "contiguous":
        return x.detach().clone()
    if layout == "offset":  # every stride a multiple of 8, but the data starts one element in
        view = nans(B, N, C + 8)[..., 1:C + 1]
        assert view.storage_offset() == 1 and view.stride() == (N * (C + 8), C + 8, 1)
    elif layout == "rowstride":  # aligned start, token stride C + 3 (odd)
        view = nans(B, N, C + 3)[..., :C]
        assert view.storage_offset() == 0 and view.stride() == (N * (C + 3), C + 3, 1)
    elif layout == "batchstride":  # aligned start, token stride C, batch stride N * C + 3 (odd)
        view = nans(B, N * C + 3)[:, :N * C].view(B, N, C)
        assert view.storage_offset() == 0 and view.stride() == (N * C + 3, C, 1)
    else:
        raise AssertionError(layout)
    with torch.no_grad():
        view.copy_(x)
    return view


# (id, (B, N, C, r), deep, dropout_p, layouts of (message, target, grad_out),
#  dtypes (cpu, gpu) or None for EDGE_CPU_DTYPES / EDGE_GPU_DTYPES)
_CONTIG = ("contiguous",) * 3
PROMPT_ADD_EDGE_CASES = [
    # odd storage offset, all strides multiples of 4/8: the CUDA kernels must take their V = 1 path
    # (a 16-byte vector load there is misaligned). B * N = 21 rows, r = 64.
    ("offset-r64-deep", (3, 7, 64, 64), True, 0.3, ("offset",) * 3, None),
    # aligned data, token stride (message, grad_out) or batch stride (target) not a multiple of 4/8
    ("stride-r8", (2, 5, 64, 8), False, 0.0, ("rowstride", "batchstride", "rowstride"), None),
    # C = 4096: 4 * (C + r) * 4 bytes = 65 KiB of shared memory per warp in the forward (> 48 KiB, needs
    # the opt-in attribute), twice that in the backward. float64 would need 264 KiB: not run.
    ("C4096", (2, 3, 4096, 16), True, 0.3, _CONTIG,
     ((torch.float32,), (torch.float32, torch.float16, torch.bfloat16))),
    # float64 C = 1024: 34 KiB per warp forward (2 warps, 68 KiB a block), 66 KiB backward
    ("C1024-fp64", (3, 7, 1024, 64), False, 0.3, _CONTIG, ((torch.float64,), (torch.float64,))),
    # one row: a single warp with 3 of its 4 rows empty
    ("M1-r1-deep", (1, 1, 40, 1), True, 0.3, _CONTIG, None),
    ("M1-r64", (1, 1, 64, 64), False, 0.3, _CONTIG, None),
    # 21 rows = 16 + 5: the second block has one full warp, one warp with a single row, two idle warps
    ("M21-r1", (3, 7, 96, 1), False, 0.3, _CONTIG, None),
]


def _edge_case_errors(backend, device, dtype, shape, deep, dropout_p, layouts):
    """Failures (as strings) of one case in one dtype; empty when all bounds hold."""
    B, N, C, r = shape
    scale, seed = 0.7, 2718
    t = {k: None if v is None else v.to(dtype) for k, v in _inputs(*shape, deep=deep, device=device, seed=20).items()}
    t["message"] = _laid_out(t["message"], layouts[0])
    t["target"] = _laid_out(t["target"], layouts[1])
    t = {k: None if v is None else v.requires_grad_(True) for k, v in t.items()}
    t_ex = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in t.items()}
    exact = _reference(t_ex, scale, dropout_p, seed=seed)
    plain = _reference(t, scale, dropout_p, seed=seed)
    out = _call(sk.prompt_add, t, scale, dropout_p=dropout_p, seed=seed, backend=backend)
    g = torch.Generator().manual_seed(21)
    go = _laid_out(torch.randn(B, N, C, generator=g, dtype=torch.float64).to(device=device, dtype=dtype), layouts[2])
    g_ex = _grads(exact, t_ex, go.double())
    g_plain = _grads(plain, t, go)
    g_got = _grads(out, t, go)
    tiny = EDGE_TINY[dtype]
    errors = []
    if out.dtype != dtype or out.shape != (B, N, C):
        errors.append(f"{dtype}: out has dtype {out.dtype} and shape {tuple(out.shape)}")
    err, err_plain = _err(out, exact), _err(plain, exact)
    if not err <= 2 * err_plain + tiny:  # (NaN fails too)
        errors.append(f"{dtype} out: error {err:.3g}, plain PyTorch {err_plain:.3g}")
    for name in g_ex:
        ref_scale = g_ex[name].abs().max().item()
        err, err_plain = _err(g_got[name], g_ex[name]), _err(g_plain[name], g_ex[name])
        if g_got[name].dtype != dtype or g_got[name].shape != t[name].shape:
            errors.append(f"{dtype} grad {name}: dtype {g_got[name].dtype}, shape {tuple(g_got[name].shape)}")
        elif not err <= 2 * err_plain + tiny * ref_scale:
            errors.append(f"{dtype} grad {name}: error {err:.3g}, plain PyTorch {err_plain:.3g}, "
                          f"largest entry {ref_scale:.3g}")
    return errors


@pytest.mark.parametrize("backend", EDGE_BACKENDS)
@pytest.mark.parametrize("case", PROMPT_ADD_EDGE_CASES, ids=lambda c: c[0])
def test_edge_cases_against_float64(backend, case):
    _, shape, deep, dropout_p, layouts, dtypes = case
    device = "cpu" if backend == "cpu" else "cuda"
    if dtypes is None:
        dtypes = EDGE_CPU_DTYPES if device == "cpu" else EDGE_GPU_DTYPES
    else:
        dtypes = dtypes[device == "cuda"]
    errors = []
    for dtype in dtypes:  # every dtype runs, the failures of all of them are reported together
        errors += _edge_case_errors(backend, device, dtype, shape, deep, dropout_p, layouts)
    assert not errors, "\n".join(errors)


# ---- Triton: rows too wide for one tile run the chunked ("wide") kernels --------------------------


@pytest.mark.parametrize("C,r,dtype,wide", [
    (768, 16, torch.bfloat16, True), (768, 16, torch.float32, False), (768, 64, torch.float16, True),
    (1280, 16, torch.bfloat16, True), (1280, 16, torch.float32, True), (1024, 64, torch.float32, True),
    (4096, 16, torch.bfloat16, True), (768, 16, torch.float64, True), (40, 3, torch.float64, False),
    (256, 16, torch.bfloat16, False), (257, 16, torch.float16, True), (200, 8, torch.float16, False)])
def test_triton_tile_plan(C, r, dtype, wide):
    """Whole rows while their tiles fit an A100 block (16-bit rows: up to 256 channels), chunks of
    channels beyond; every tile fits."""
    from sa2vp_kernels.triton import prompt_add as tp
    block_m, block_c, block_r, _, is_wide = tp._row_blocks(C, r, dtype)
    assert is_wide == wide
    assert (block_c < C) == wide and block_c & (block_c - 1) == 0 and block_r >= r
    assert tp._tile_shared_bytes(block_m, block_c, block_r, dtype, wide) <= (48 * 1024 if wide else tp._A100_SHARED)


def test_triton_check_fits_names_the_limit(monkeypatch):
    from sa2vp_kernels.triton import prompt_add as tp
    monkeypatch.setattr(tp, "_shared_limit", lambda device: 48 * 1024)
    cuda = torch.device("cuda")
    monkeypatch.setattr(tp, "_INTERPRETED", True)
    tp._check_fits(16, 1024, 16, torch.float32, cuda, 768, 16)  # the interpreter has no shared memory
    monkeypatch.setattr(tp, "_INTERPRETED", False)
    tp._check_fits(16, 1024, 16, torch.float32, torch.device("cpu"), 768, 16)
    tp._check_fits(16, 256, 16, torch.float32, cuda, 768, 16)
    with pytest.raises(ValueError, match=r"tiles of 1024 channels \(768 channels, rank r = 16, float32\) need "
                                         r"131072 bytes .* this GPU has 49152"):
        tp._check_fits(16, 1024, 16, torch.float32, cuda, 768, 16)


@pytest.fixture(params=[True, False], ids=["one-pass", "three-pass"])
def wide_triton(monkeypatch, request):
    """The Triton prompt_add with every row chunked into 16 channels (C = 40: two full chunks and a
    partial one), so the interpreter runs the wide kernels at small shapes; with the forward's
    statistics in one pass, the backward's LayerNorm sums from z and its parameter gradients from one
    kernel (the defaults), or the statistics and sums over the message and the parameter gradients from
    PyTorch ops."""
    from sa2vp_kernels.triton import prompt_add as tp
    monkeypatch.setattr(tp, "FWD_ONE_PASS", request.param)
    monkeypatch.setattr(tp, "BWD_FROM_Z", request.param)
    monkeypatch.setattr(tp, "BWD_FINALIZE_KERNEL", request.param)
    monkeypatch.setattr(tp, "_WIDE_SHARED", 0)
    monkeypatch.setattr(tp, "_CHUNK_SHARED", 16 * 16 * 2)  # (16 + 16) x 16 channels of 1 byte: 16 channels
    assert tp._row_blocks(40, 3, torch.float64)[1::3] == (16, True)
    return tp


@pytest.mark.parametrize("deep,p", [(True, 0.0), (False, 0.3)])
def test_triton_wide_gradcheck(wide_triton, deep, p):
    t = _inputs(2, 3, 40, 3, deep=deep, requires_grad=True, seed=23)
    names = [k for k in NAMES if t[k] is not None]

    def fn(*args):
        d = dict(zip(names, args))
        d.setdefault("deep", None)
        d.setdefault("deep_scale", None)
        return _call(sk.prompt_add, d, 0.6, dropout_p=p, seed=5, backend="triton")

    assert torch.autograd.gradcheck(fn, [t[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_wide_matches_reference(wide_triton, dtype):
    t64 = _inputs(3, 7, 40, 5, deep=True, requires_grad=True, seed=24)
    t = {k: v.detach().to(dtype).requires_grad_(True) for k, v in t64.items()}
    out = _call(sk.prompt_add, t, 0.7, dropout_p=0.25, seed=9, backend="triton")
    t_ex = {k: v.detach().double().requires_grad_(True) for k, v in t.items()}
    exact = _reference(t_ex, 0.7, 0.25, seed=9)
    tol = {torch.float32: 2e-5, torch.float64: 1e-11}[dtype]
    torch.testing.assert_close(out.double(), exact.detach(), rtol=tol, atol=tol)
    go = torch.randn(3, 7, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g, g_ex = _grads(out, t, go.to(dtype)), _grads(exact, t_ex, go)
    for name in g_ex:
        scale = g_ex[name].abs().max().item()
        torch.testing.assert_close(g[name].double(), g_ex[name], rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("offset", ["constant", "first-chunk"])
def test_triton_wide_float32_rows_far_from_zero_mean(wide_triton, offset):
    """Rows whose mean is far larger than their spread (the one-pass statistics shift by the first
    chunk's mean; "first-chunk": that chunk's mean is not the row's) keep float32 accuracy."""
    t64 = _inputs(2, 5, 40, 3, deep=False, requires_grad=True, seed=25)
    msg = t64["message"].detach()
    if offset == "constant":
        msg = msg + 300.0
    else:
        msg = msg + torch.where(torch.arange(40) < 16, -40.0, 25.0)
    t64["message"] = msg.requires_grad_(True)
    t = {k: None if v is None else v.detach().float().requires_grad_(True) for k, v in t64.items()}
    out = _call(sk.prompt_add, t, 0.7, dropout_p=0.0, seed=9, backend="triton")
    t_ex = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in t.items()}
    exact = _reference(t_ex, 0.7, 0.0, seed=9)
    delta = (out.double() - t_ex["target"]).detach()  # the added message alone (target is exact)
    torch.testing.assert_close(delta, (exact - t_ex["target"]).detach(), rtol=1e-4, atol=1e-5)
    go = torch.randn(2, 5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g, g_ex = _grads(out, t, go.float()), _grads(exact, t_ex, go)
    for name in g_ex:
        scale = g_ex[name].abs().max().item()
        torch.testing.assert_close(g[name].double(), g_ex[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


# ---- eager calls of the Triton backend run its launchers directly (_dispatch.eager_triton) ---------


def test_triton_eager_path_matches_the_registered_ops(monkeypatch):
    """Same outputs and gradients, bitwise, as through the registered ops, without their dispatch."""
    import importlib

    from sa2vp_kernels import _dispatch
    from sa2vp_kernels.triton import prompt_add as tpa

    pa = importlib.import_module("sa2vp_kernels.prompt_add")  # (sk.prompt_add is the function)

    base = _inputs(2, 7, 24, 3, deep=True, seed=31)
    go = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(pa, "eager_triton", lambda *t, eager=eager: eager)
        t = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in base.items()}
        out = _call(sk.prompt_add, t, 0.7, dropout_p=0.3, seed=5, backend="triton")
        grads = torch.autograd.grad(out, [v for v in t.values() if v is not None], go)
        with torch.no_grad():
            plain = _call(sk.prompt_add, t, 0.7, dropout_p=0.3, seed=5, backend="triton")
        results.append((out.detach(), plain, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)

    def boom(*args, **kwargs):
        raise AssertionError("the registered op was dispatched")

    monkeypatch.setattr(pa, "eager_triton", _dispatch.eager_triton)
    monkeypatch.setattr(tpa, "prompt_add_fwd_triton", boom)
    monkeypatch.setattr(tpa, "prompt_add_bwd_triton", boom)
    # the weights as a model holds them: nn.Parameter
    t = {k: None if v is None else (v.detach().clone().requires_grad_(True) if k in ("target", "message")
                                    else nn.Parameter(v.detach().clone())) for k, v in base.items()}
    out = _call(sk.prompt_add, t, 0.7, dropout_p=0.3, seed=5, backend="triton")
    g = torch.autograd.grad(out, t["message"], go, create_graph=True)[0]
    assert torch.equal(g.detach(), results[0][3])
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), t["message"])
