"""pytest-benchmark configuration of the micro-benchmarks.

Every benchmark reports its median to a session-wide list through the ``record`` fixture; with
``--sa2vp-save`` the list, the speed-up ratios and the machine's description are written to
``bench/results/<device>-<date>.json`` (``cpu-<date>.json`` on the CPU) at the end of the session.

Triton kernels run under the interpreter without a GPU; the CPU suite leaves them out (the
interpreter's speed means nothing), but importing the package must still work.
``SA2VP_BENCH_THREADS=n`` sets torch's CPU thread count.
"""
import os
import shutil
import sys
import time

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_RECORDS: list = []
# On a shared, busy machine more threads than free cores make every timing a scheduling lottery:
# SA2VP_BENCH_THREADS=1 gives stabler numbers there (the thread count is recorded with the results).
if os.environ.get("SA2VP_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SA2VP_BENCH_THREADS"]))


def pytest_addoption(parser):
    parser.addoption("--sa2vp-save", action="store_true", default=False,
                     help="write the medians and speed-up ratios to bench/results/<device>-<date>.json")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def record():
    """``record(section, case, provider, pass_, benchmark)``: keep the benchmark's median for the results
    file (nothing is kept when benchmarks are disabled)."""

    def _record(section, case, provider, pass_, benchmark, note=""):
        stats = getattr(benchmark, "stats", None)
        if stats is None:
            return
        s = stats.stats
        ms = s.median * 1e3
        entry = {"section": section, "case": case.label, "provider": provider, "pass": pass_, "ms": ms,
                 "ms_q1": s.q1 * 1e3, "ms_q3": s.q3 * 1e3, "ms_min": s.min * 1e3, "rounds": s.rounds, **case.params()}
        nbytes = case.bytes(pass_)
        entry["bytes"] = nbytes
        entry["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if note:
            entry["note"] = note
        _RECORDS.append(entry)

    return _record


def run(benchmark, workload, pass_, device, *, budget_s=1.0, min_rounds=3, max_rounds=1000):
    """Time ``pass_`` of ``workload`` with pytest-benchmark: one timed warm-up call, then enough rounds
    to fill about ``budget_s`` seconds (each round one call on the next rotating input set)."""
    fn = workload.runner(pass_)
    cuda = device.type == "cuda"

    def call():
        fn()
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    call()
    dt = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / dt)))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 10 else 0)


@pytest.fixture
def bench_run():
    return run


def skip_unavailable(make):
    """Build a workload, skipping the test when its provider cannot run here."""
    try:
        return make()
    except common.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def workload_or_skip():
    return skip_unavailable


@pytest.fixture
def isa_backend(monkeypatch):
    """``isa_backend(provider)``: the backend to call for ``provider``. ``"cpu-avx2"`` and ``"cpu-generic"``
    are the ``cpu`` backend capped to that instruction set (SA2VP_CPU_ISA, for this test only); the
    test is skipped where the processor lacks it. Other providers pass through."""
    from sa2vp_kernels import _ext

    def _backend(provider: str) -> str:
        if not provider.startswith("cpu-"):
            return provider
        isa = provider.split("-", 1)[1]
        supported = _ext.cpu_isa()[1]
        if _ext.CPU_ISAS.index(isa) > _ext.CPU_ISAS.index(supported):
            pytest.skip(f"this processor has no {isa}")
        monkeypatch.setenv("SA2VP_CPU_ISA", isa)
        return "cpu"

    return _backend


def pytest_sessionfinish(session, exitstatus):
    if not session.config.getoption("--sa2vp-save") or not _RECORDS:
        return
    results = common.new_results(DEVICE, source="pytest-benchmark (bench/test_bench_*.py)")
    results["bandwidth"] = bw = common.copy_bandwidth(DEVICE, (1 << 30) if DEVICE.type == "cuda" else (256 << 20))
    results["records"] = [{**r, "bw_frac": r["gbps"] / bw["gbps"]} for r in _RECORDS]
    path = common.results_path(results)
    common.write_results(results, [path])
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"sa2vp results: {path}"]
    for r in results["ratios"]:
        if "target" in r:
            lines.append(f"  {r['section']} {r['case']} {r['pass']}: {r['ours']} is {r['speedup']:.2f}x "
                         f"{r['baseline']} (target >= {r['target']:g}x: {'met' if r['met'] else 'NOT met'})")
    if tr is not None:
        for line in lines:
            tr.write_line(line)
