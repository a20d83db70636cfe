"""Micro-benchmarks of prompt_map (bilinear resampling of the prompt map, up-projection, bias and
positional embedding) against the reference composition (F.interpolate + F.linear + add)."""
import pytest
import torch

import common

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
PROVIDERS = common.kernel_backends(DEVICE) + ("reference",) + common.isa_variants(DEVICE)
GRIDS = [((14, 14), (14, 14)), ((28, 28), (14, 14))]


@pytest.mark.parametrize("pass_", common.PASSES)
@pytest.mark.parametrize("grids", GRIDS, ids=lambda g: f"{g[0][0]}x{g[0][1]}-from-{g[1][0]}x{g[1][1]}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_prompt_map(benchmark, record, bench_run, workload_or_skip, isa_backend, provider, grids, pass_):
    case = common.PromptMapCase(grid=grids[0], embed_grid=grids[1], width=768, rank=16)
    backend = isa_backend(provider)
    work = workload_or_skip(lambda: common.prompt_map_workload(backend, case, DEVICE))
    benchmark.group = f"prompt_map {case.label} {pass_}"
    bench_run(benchmark, work, pass_, DEVICE, budget_s=0.5)
    record("prompt_map", case, provider, pass_, benchmark, work.note)
