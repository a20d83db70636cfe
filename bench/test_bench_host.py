"""Host time per call: the ops on tiny inputs, where the kernels take next to nothing and what is left
is the Python entry point, argument checks, autograd bookkeeping and dispatch.

On a GPU this overhead is what an eager call of a small op costs on top of its kernel; here it is
measured on the CPU (same code path up to the kernel) against the unfused composition / reference.
"""
import pytest
import torch

import common

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", common.kernel_backends(DEVICE) + ("unfused", "reference"))
def test_host_prompt_add(benchmark, record, bench_run, workload_or_skip, provider, pass_):
    case = common.PromptAddCase(1, 5, 16, 2, scale=0.1, dropout_p=0.1, dtype=DTYPE)
    work = workload_or_skip(lambda: common.prompt_add_workload(provider, case, DEVICE))
    benchmark.group = f"host prompt_add {case.label} {pass_}"
    bench_run(benchmark, work, pass_, DEVICE, budget_s=1.0)
    record("host", case, provider, pass_, benchmark, work.note)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", common.kernel_backends(DEVICE) + ("reference", "sdpa_masked"))
def test_host_local_attention(benchmark, record, bench_run, workload_or_skip, provider, pass_):
    case = common.AttnCase(1, 1, 8, grid=(2, 2), dtype=DTYPE)
    work = workload_or_skip(lambda: common.attention_workload(provider, case, DEVICE))
    benchmark.group = f"host attention {case.label} {pass_}"
    bench_run(benchmark, work, pass_, DEVICE, budget_s=1.0)
    record("host", case, provider, pass_, benchmark, work.note)
