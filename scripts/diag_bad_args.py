#!/usr/bin/env python3
"""Diagnose a crash (instead of a RuntimeError) of the compiled ops on bad arguments, on a GPU.

Each call runs in its own process and reports its exit status: a clean RuntimeError prints its
message, a crash its signal. With gdb on the machine, a crashing call is re-run under gdb for a native
backtrace. Usage: python scripts/diag_bad_args.py [--gdb]
"""
import shutil
import subprocess
import sys

PRELUDE = """
import torch, sa2vp_kernels
dev = {dev!r}
q = torch.randn(1, 1, 5, 8, device=dev)
"""
CALLS = {
    "wrong N (raw op)": "torch.ops.sa2vp_kernels.local_attn_fwd(q, q, q, 2, 3, 3, 1, False, 0.5)",
    "wrong N, CUDA kernel below autograd": (
        "ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA); "
        "torch.ops.sa2vp_kernels.local_attn_fwd.default.redispatch(ks, q, q, q, 2, 3, 3, 1, False, 0.5)"),
    "prompt_add bad r (raw op)": (
        "t = torch.randn(1, 3, 8, device=dev); "
        "torch.ops.sa2vp_kernels.prompt_add_fwd(t, t, t[0, 0], t[0, 0], torch.randn(2, 8, device=dev), "
        "torch.randn(3, device=dev), torch.randn(8, 2, device=dev), t[0, 0], None, None, 0.5, 0.0, 1e-6, 0)"),
    "wrong N, CPU tensors (raw op)": "torch.ops.sa2vp_kernels.local_attn_fwd(q.cpu(), q.cpu(), q.cpu(), 2, 3, 3, 1, False, 0.5)",
}


def run(code, env_extra=None, use_gdb=False):
    import os
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-X", "faulthandler", "-c", code]
    if use_gdb:
        cmd = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args"] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, (p.stdout + p.stderr)


def main():
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    crashed = []
    for name, call in CALLS.items():
        code = PRELUDE.format(dev=dev) + f"""
try:
    {call}
    print("RESULT: no error")
except RuntimeError as e:
    print("RESULT: RuntimeError:", str(e).splitlines()[0][:200])
"""
        for env in ({},):
            rc, out = run(code, env)
            res = [l for l in out.splitlines() if l.startswith("RESULT")]
            tag = f"{name} {env or ''}"
            print(f"{tag:70s} rc={rc} {res[0] if res else out.strip().splitlines()[-1:] }", flush=True)
            if rc != 0 and not res:
                crashed.append((name, code, env))
    if crashed and "--gdb" in sys.argv and shutil.which("gdb"):
        name, code, env = crashed[0]
        rc, out = run(code, env, use_gdb=True)
        print(f"== gdb backtrace of: {name}")
        print("\n".join(l for l in out.splitlines() if l.startswith("#") or "signal" in l.lower())[:6000])
    elif crashed:
        print("gdb:", shutil.which("gdb"))


if __name__ == "__main__":
    main()
