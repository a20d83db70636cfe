#!/usr/bin/env python3
"""Host time of eager calls of the Triton backend, without the kernels, by the paths a call can take.

    python bench/triton_host.py [--rounds 400] [--out bench/results]

Runs on CPU tensors with the Triton kernels compiled as they are for a GPU (no TRITON_INTERPRET) and
Triton's launch itself (``JITFunction.run``) replaced by a no-op, so what is timed is everything around
the launches: the public entry point's checks, the dispatch, the autograd bookkeeping, the launchers'
allocations and argument set-up, and torch's ``wrap_triton`` (Triton's own launcher, which needs a GPU,
comes on top on every path). The paths:

* ``eager``: what eager calls take, the launchers inside a plain ``torch.autograd.Function``
  (``sa2vp_kernels._dispatch.eager_triton``), launching directly (``_dispatch.direct_launches``);
* ``eager_hop``: the same, but every launch through ``wrap_triton``'s higher-order-op dispatch, as eager
  calls launched before ``direct_launches`` (what tracing needs, and what eager calls do not);
* ``registered``: the registered ``triton_op``s with their generated autograd, what ``torch.compile``
  and dispatch modes see.

For local_cross_attention (B=1, 1 head, 2 x 2 grid + CLS, head_dim 8) and prompt_add (B=1, N=5, C=16,
r=2, dropout 0.1): forward without grad, forward with grad, forward + backward; the paths alternate
call by call (interleaved rounds). Writes bench/results/cpu-triton-host-<date>.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels as on a GPU

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import sa2vp_kernels as sk  # noqa: E402
from sa2vp_kernels import _dispatch  # noqa: E402

PATHS = ("eager", "eager_hop", "registered")
# (the package exports the functions under the modules' names: the modules come from importlib)
_MODULES = tuple(importlib.import_module(f"sa2vp_kernels.{name}") for name in ("local_attention", "prompt_add"))
_EAGER_TRITON, _SET_WRAP = _dispatch.eager_triton, _dispatch._set_wrap_triton_enabled


def _stub_launches() -> None:
    """Triton's launch becomes a no-op, and the Triton backend is allowed on CPU tensors."""
    JITFunction.run = lambda self, *args, **kwargs: None
    for module in _MODULES:
        module._resolve_backend = lambda backend, device: "triton"


def _set_path(path: str) -> None:
    _dispatch._set_wrap_triton_enabled = None if path == "eager_hop" else _SET_WRAP
    choice = _EAGER_TRITON if path != "registered" else (lambda *tensors: False)
    for module in _MODULES:
        module.eager_triton = choice


def _calls() -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 8, generator=g) for _ in range(3))
    qkv = [t.clone().requires_grad_(True) for t in (q, k, v)]
    go = torch.randn(1, 1, 5, 8, generator=g)

    def attention(*t):
        return sk.local_cross_attention(*t, (2, 2), backend="triton")

    C, r = 16, 2
    target, message = torch.randn(1, 5, C, generator=g), torch.randn(1, 5, C, generator=g)
    weights = [torch.randn(*s, generator=g) for s in ((C,), (C,), (r, C), (r,), (C, r), (C,))]
    weights_g = [w.clone().requires_grad_(True) for w in weights]
    go_pa = torch.randn(1, 5, C, generator=g)

    def prompt_add(*w):
        return sk.prompt_add(target, message, 0.1, *w, dropout_p=0.1, seed=3, backend="triton")

    return {
        ("local_cross_attention", "fwd (no grad)"): lambda: attention(q, k, v),
        ("local_cross_attention", "fwd (grad)"): lambda: attention(*qkv),
        ("local_cross_attention", "fwd+bwd"): lambda: torch.autograd.grad(attention(*qkv), qkv, go),
        ("prompt_add", "fwd (no grad)"): lambda: prompt_add(*weights),
        ("prompt_add", "fwd (grad)"): lambda: prompt_add(*weights_g),
        ("prompt_add", "fwd+bwd"): lambda: torch.autograd.grad(prompt_add(*weights_g), weights_g, go_pa),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=400, help="timed calls per path and case (after 20 warm-up)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _stub_launches()
    results = common.new_results(torch.device("cpu"), source="bench/triton_host.py (Triton launches stubbed, interleaved)")
    results["meta"]["rounds"] = args.rounds
    rows = []
    for (op, what), fn in _calls().items():
        times = {p: [] for p in PATHS}
        for i in range(20 + args.rounds):
            for p in (PATHS if i % 2 else PATHS[::-1]):
                _set_path(p)
                t0 = time.perf_counter()
                fn()
                if i >= 20:
                    times[p].append((time.perf_counter() - t0) * 1e6)
        med = {p: statistics.median(t) for p, t in times.items()}
        rows.append({"op": op, "call": what, **{f"{p}_us": med[p] for p in PATHS},
                     "ratio": med["registered"] / med["eager"], "ratio_hop": med["eager_hop"] / med["eager"]})
        print(f"{op:<22} {what:<14} eager {med['eager']:7.1f} us   through the HOP {med['eager_hop']:7.1f} us "
              f"({rows[-1]['ratio_hop']:.2f}x)   registered ops {med['registered']:7.1f} us "
              f"({rows[-1]['ratio']:.2f}x)", flush=True)
    _set_path("eager")
    results["host"] = rows
    out = common.write_json(Path(args.out) / f"cpu-triton-host-{results['meta']['date']}.json", results)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
