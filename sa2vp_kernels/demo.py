"""Compare the backends of local_cross_attention on a real-sized input (ViT-B/16 at 224: 14 x 14 + CLS).

Run: ``python -m sa2vp_kernels.demo [--batch 8] [--heads 12] [--repeats 5]``.  Prints the median time
of forward+backward per backend and the max error against the float64 oracle.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sa2vp_kernels as sk
from sa2vp_kernels.reference import local_cross_attention_vectorized


def _time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12, help="heads; head_dim = 768 / heads")
    parser.add_argument("--grid", type=int, nargs=2, default=(14, 14))
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--border", choices=("clip", "zero"), default="clip")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if 768 % args.heads:
        parser.error("--heads must divide 768")
    B, H, D = args.batch, args.heads, 768 // args.heads
    grid = tuple(args.grid)
    N = 1 + grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    dout = torch.randn(B, H, N, D, generator=g)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = local_cross_attention_vectorized(q64, k64, v64, grid, args.window, 1, args.border)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    print(f"local_cross_attention, B={B}, {H} heads x {D}, grid {grid[0]}x{grid[1]} + CLS, "
          f"window {args.window}, border {args.border}, float32, {torch.get_num_threads()} threads")
    print(f"{'backend':<12}{'fwd+bwd (ms)':>14}{'vs reference':>14}{'max err out':>14}{'max err grad':>14}")
    backends = ["reference"] + (["cpu"] if sk.extension_available() else [])
    base = None
    for backend in backends:
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))

        def step():
            out = sk.local_cross_attention(qs, ks, vs, grid, window=args.window, border=args.border,
                                           backend=backend)
            return out, torch.autograd.grad(out, (qs, ks, vs), dout)

        t = _time(step, args.repeats)
        out, grads = step()
        err = (out.double() - ref).abs().max().item()
        gerr = max((a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads))
        base = base or t
        print(f"{backend:<12}{t * 1e3:>14.2f}{base / t:>13.1f}x{err:>14.2e}{gerr:>14.2e}")
    if not sk.extension_available():
        print("the compiled 'cpu' backend is not built: pip install --no-build-isolation -e .")


if __name__ == "__main__":
    main()
