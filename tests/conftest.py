"""Test configuration: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported (sa2vp_kernels imports it), so this runs
before any test module imports the package.
"""
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    global _XDIST_WORKER
    # a pytest-xdist worker has `workerinput` (its environment variables are no test: a pytest started
    # by a test inherits them)
    _XDIST_WORKER = hasattr(config, "workerinput")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: longer CPU tests")
    # pytest-timeout's marker (GPU machines run the tests under --timeout); known here without the plugin
    config.addinivalue_line("markers", "timeout(seconds): a longer per-test limit under pytest-timeout")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# SA2VP_FAILURE_LOG=path: each failing test's report is appended to that file as soon as it fails, so
# a run cut short by a time limit (bench/gpu_check.sh on a lent GPU) still leaves its failures behind.
_FAILURE_LOG = os.environ.get("SA2VP_FAILURE_LOG")
_XDIST_WORKER = False


def pytest_runtest_logreport(report):
    # (under pytest-xdist the controller writes: it also reports a worker that crashed)
    if not _FAILURE_LOG or not report.failed or _XDIST_WORKER:
        return
    with open(_FAILURE_LOG, "a") as f:
        f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
