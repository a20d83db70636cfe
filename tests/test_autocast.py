"""The ops under ``torch.autocast``: inputs brought to one dtype (the widest, at least float32 on the CPU).

On the CPU, bfloat16 activations (what autocast's matmuls produce) run the float32 kernels: the result
must equal the op called outside autocast on the same values in float32, bit for bit, on every backend
(autocast is off inside the op, so the reference's own matmuls are not cast down either), and the
gradients come back in each input's dtype. Outside autocast the CPU still rejects 16-bit inputs.
"""
import pytest
import torch

import sa2vp_kernels as sk
from sa2vp_kernels._dispatch import triton_available

def _cpu_backends():
    backends = ["reference"]
    if sk.extension_available():
        backends.append("cpu")
    if triton_available():
        backends.append("triton")
    return backends


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _check_against_float32(call, inputs, autocast_device="cpu", autocast_dtype=torch.bfloat16):
    """call(*inputs) under autocast against call(*float32 copies) without it: values, dtypes, gradients."""
    leaves = _leaves(*inputs)
    with torch.autocast(autocast_device, dtype=autocast_dtype):
        out = call(*leaves)
    assert out.dtype == torch.float32
    grads = _grads(out, leaves)

    leaves32 = _leaves(*(t.float() for t in inputs))
    out32 = call(*leaves32)
    grads32 = _grads(out32, leaves32)

    torch.testing.assert_close(out, out32, rtol=0, atol=0)
    for x, g, g32 in zip(leaves, grads, grads32):
        assert g.dtype == x.dtype, "each gradient comes back in its input's dtype"
        torch.testing.assert_close(g, g32.to(x.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("border", ["clip", "zero"])
def test_local_attention_cpu_autocast(backend, border):
    gen = torch.Generator().manual_seed(1)
    B, H, grid, d = 2, 3, (3, 4), 8
    N = 1 + grid[0] * grid[1]
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(torch.bfloat16) for _ in range(3))

    def call(q, k, v):
        return sk.local_cross_attention(q, k, v, grid, window=3, num_prefix=1, border=border, backend=backend)

    _check_against_float32(call, (q, k, v))


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_prompt_add_cpu_autocast_mixed_dtypes(backend, dropout_p):
    """A bfloat16 message (an autocast matmul's output) beside a float32 residual stream and parameters."""
    gen = torch.Generator().manual_seed(2)
    B, N, C, r = 2, 7, 24, 3
    target = torch.randn(B, N, C, generator=gen)
    message = torch.randn(B, N, C, generator=gen).to(torch.bfloat16)
    params = [torch.randn(C, generator=gen), torch.randn(C, generator=gen), torch.randn(r, C, generator=gen),
              torch.randn(r, generator=gen), torch.randn(C, r, generator=gen), torch.randn(C, generator=gen)]
    deep, deep_scale = torch.randn(1, N, C, generator=gen).to(torch.bfloat16), torch.randn(C, generator=gen)

    def call(target, message, nw, nb, dw, db, uw, ub, deep, deep_scale):
        return sk.prompt_add(target, message, 0.7, nw, nb, dw, db, uw, ub, deep=deep, deep_scale=deep_scale,
                             dropout_p=dropout_p, seed=11, backend=backend)

    _check_against_float32(call, (target, message, *params, deep, deep_scale))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_prompt_map_cpu_autocast(backend):
    gen = torch.Generator().manual_seed(3)
    r, C, grid, embed_grid = 3, 24, (4, 5), (3, 2)
    embed = torch.randn(1 + 6, r, generator=gen).to(torch.bfloat16)
    weight, bias = torch.randn(C, r, generator=gen), torch.randn(C, generator=gen)
    pos = torch.randn(1, 1 + 20, C, generator=gen).to(torch.bfloat16)

    def call(embed, weight, bias, pos):
        return sk.prompt_map(embed, weight, bias, pos, grid, num_prefix=1, embed_grid=embed_grid, backend=backend)

    _check_against_float32(call, (embed, weight, bias, pos))


def test_float64_wins_under_cpu_autocast():
    """The widest dtype decides: a float64 input makes the op compute (and return) float64."""
    gen = torch.Generator().manual_seed(4)
    grid, N = (2, 3), 7
    q = torch.randn(1, 1, N, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, N, 8, generator=gen).to(torch.bfloat16) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sk.local_cross_attention(q, k, v, grid, backend="reference")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sk.local_cross_attention(q, k.double(), v.double(), grid, backend="reference"),
                               rtol=0, atol=0)


def test_16bit_on_cpu_without_autocast_is_an_error():
    q = torch.randn(1, 1, 7, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q has dtype torch.bfloat16; on cpu the supported dtypes"):
        sk.local_cross_attention(q, q, q, (2, 3), backend="reference")
    # autocast on another device type does not change the CPU's contract
    with torch.autocast("cuda", enabled=False), pytest.raises(TypeError, match="q has dtype"):
        sk.local_cross_attention(q, q, q, (2, 3), backend="reference")


def test_bad_arguments_still_named_under_autocast():
    q = torch.randn(1, 1, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="k must be a floating-point tensor"):
            sk.local_cross_attention(q, torch.ones(1, 1, 7, 8, dtype=torch.int64), q, (2, 3))
        with pytest.raises(ValueError, match="grid"):
            sk.local_cross_attention(q, q, q, (3, 3))


def test_compile_fullgraph_under_cpu_autocast():
    """torch.compile traces the autocast handling (the check, the casts, autocast off inside the op)."""
    if not sk.extension_available():
        pytest.skip("needs the compiled extension")
    gen = torch.Generator().manual_seed(6)
    B, N, C, r, grid = 2, 13, 24, 3, (3, 4)
    q, k, v = (torch.randn(B, 3, N, 8, generator=gen).to(torch.bfloat16) for _ in range(3))
    target = torch.randn(B, N, C, generator=gen)
    params = [torch.randn(C, generator=gen), torch.randn(C, generator=gen), torch.randn(r, C, generator=gen),
              torch.randn(r, generator=gen), torch.randn(C, r, generator=gen), torch.randn(C, generator=gen)]

    def f(q, k, v, target, *params):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = sk.local_cross_attention(q, k, v, grid, backend="cpu")
            message = a.transpose(1, 2).reshape(B, N, C).to(torch.bfloat16)
            return sk.prompt_add(target, message, 0.5, *params, backend="cpu")

    inputs = _leaves(q, k, v, target, *params)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    grads = _grads(out, inputs)
    inputs_eager = _leaves(q, k, v, target, *params)
    out_eager = f(*inputs_eager)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    for g, g_eager, x in zip(grads, _grads(out_eager, inputs_eager), inputs):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g, g_eager, rtol=0, atol=0)


def test_sa2vp_model_trains_under_cpu_autocast():
    """A tiny SA2VP forward + backward under CPU bfloat16 autocast with the fused CPU kernels: the
    prompt pathway's ops get bfloat16 q/k/v from the autocast qkv projection (a TypeError before)."""
    if not sk.extension_available():
        pytest.skip("needs the compiled extension")
    import sa2vp
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=(32, 40), patch_size=8, embed_dim=48, depth=4, num_heads=3,
                                 num_classes=0)
    config = sa2vp.SA2VPConfig.from_variant("paper", r=4, b2p_layers=(0, 2), adapter_dropout=0.0,
                                            attn_dropout=0.0, backend="cpu")
    model = sa2vp.SA2VP(backbone, 3, config).eval()
    images, labels = torch.randn(2, 3, 32, 40), torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = model.loss(out, labels)
    loss.backward()
    grads = [p.grad for _, p in model.trainable_parameters()]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        loss32 = model.loss(model(images), labels)
    assert abs(loss.item() - loss32.item()) < 0.03 * abs(loss32.item()) + 0.01


@pytest.mark.gpu
def test_cuda_autocast_keeps_16bit_and_promotes_mixed():
    """On a GPU, 16-bit q/k/v stay 16-bit under autocast (the fast path); mixed dtypes compute in the
    widest one instead of failing the dtype check."""
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(5)
    grid, N = (5, 4), 21
    q, k, v = (torch.randn(2, 3, N, 16, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
    with torch.autocast(dev, dtype=torch.bfloat16):
        out = sk.local_cross_attention(q, k, v, grid)
        mixed = sk.local_cross_attention(q, k.float(), v, grid)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, sk.local_cross_attention(q, k, v, grid), rtol=0, atol=0)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, sk.local_cross_attention(q.float(), k.float(), v.float(), grid),
                               rtol=0, atol=0)
