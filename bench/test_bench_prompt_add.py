"""Micro-benchmarks of prompt_add (LayerNorm -> down -> GELU -> dropout -> up -> dropout -> scaled add)
against the unfused nn composition it replaces and sa2vp_kernels' reference backend.

CPU: B=8, N=197, C=768, r=16, float32 (the issue's target: cpu >= 3x the unfused composition).
``gemms`` times the six low-rank matmuls alone (forward and backward), a floor for any float32 version.
GPU: B=64, bfloat16, plus the unfused composition under torch.compile.
"""
import pytest
import torch

import common

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BATCH, DTYPE = (64, torch.bfloat16) if ON_GPU else (8, torch.float32)
PROVIDERS = (common.kernel_backends(DEVICE) + ("reference", "unfused") + (("unfused_compiled",) if ON_GPU else ())
             + ("gemms",) + common.isa_variants(DEVICE))


@pytest.mark.parametrize("pass_", common.PASSES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_prompt_add(benchmark, record, bench_run, workload_or_skip, isa_backend, provider, dropout_p, pass_):
    case = common.PromptAddCase(BATCH, 197, 768, 16, scale=0.1, dropout_p=dropout_p, dtype=DTYPE)
    backend = isa_backend(provider)
    work = workload_or_skip(lambda: common.prompt_add_workload(backend, case, DEVICE))
    benchmark.group = f"prompt_add {case.label} {pass_}"
    bench_run(benchmark, work, pass_, DEVICE)
    record("prompt_add", case, provider, pass_, benchmark, work.note)
