"""Micro-benchmarks of local cross attention: our backends against the vectorised reference, dense SDPA
with a boolean neighbourhood mask and, on a GPU, FlexAttention and NATTEN.

CPU: B=8, 14x14 grid + CLS, float32 (the issue's target: cpu fwd+bwd >= 5x the reference).
GPU: B=64, bfloat16.  Run with ``make bench`` or ``pytest bench --benchmark-only``.
"""
import pytest
import torch

import common

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BATCH, DTYPE = (64, torch.bfloat16) if ON_GPU else (8, torch.float32)
LAYOUTS = [(1, 768), (12, 64)]
KERNELS = common.kernel_backends(DEVICE)
PEERS = ("reference", "sdpa_masked") + (("flex", "natten") if ON_GPU else ())
SCALING_GRIDS = [(14, 14), (28, 28), (64, 64)] if ON_GPU else [(14, 14), (28, 28)]


def _layout_id(layout):
    return f"{layout[0]}x{layout[1]}"


@pytest.mark.parametrize("pass_", common.PASSES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("provider", KERNELS + PEERS)
def test_local_attention(benchmark, record, bench_run, workload_or_skip, provider, layout, pass_):
    case = common.AttnCase(BATCH, *layout, grid=(14, 14), dtype=DTYPE)
    work = workload_or_skip(lambda: common.attention_workload(provider, case, DEVICE))
    benchmark.group = f"attention {case.label} {pass_}"
    bench_run(benchmark, work, pass_, DEVICE)
    record("attention", case, provider, pass_, benchmark, work.note)


@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("provider", KERNELS + (("reference",) if ON_GPU else ()))
def test_local_attention_windows(benchmark, record, bench_run, workload_or_skip, provider, window):
    case = common.AttnCase(BATCH, 12, 64, grid=(14, 14), window=window, dtype=DTYPE)
    work = workload_or_skip(lambda: common.attention_workload(provider, case, DEVICE))
    benchmark.group = f"attention windows {case.label} fwd+bwd"
    bench_run(benchmark, work, "fwd+bwd", DEVICE)
    record("windows", case, provider, "fwd+bwd", benchmark, work.note)


@pytest.mark.parametrize("grid", SCALING_GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("provider", KERNELS + PEERS)
def test_local_attention_scaling(benchmark, record, bench_run, workload_or_skip, provider, grid):
    if provider == "sdpa_masked" and not ON_GPU and grid != (14, 14):
        pytest.skip("dense masked attention grows as N^2: only the smallest grid on the CPU")
    case = common.AttnCase(BATCH, 12, 64, grid=grid, dtype=DTYPE)
    work = workload_or_skip(lambda: common.attention_workload(provider, case, DEVICE))
    benchmark.group = f"attention scaling {case.label} fwd+bwd"
    bench_run(benchmark, work, "fwd+bwd", DEVICE)
    record("scaling", case, provider, "fwd+bwd", benchmark, work.note)
