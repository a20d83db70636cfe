#!/usr/bin/env python3
"""Bring the results of a `make gpu-tune` run (its $OUT folder, copied back from the GPU machine) into the
repository, ready to commit.

    python3 bench/collect_tune.py OUT            # copies, then prints what to commit
    python3 bench/collect_tune.py OUT --dry-run  # prints what it would copy

* the tuned file (``<device>.json`` in tuning.py's format) goes to ``sa2vp_kernels/triton/tuned/``,
  after the same check the package applies;
* the variants' results (``<device>-<date>-variants-*.json``), the benchmarks' results file
  (``<device>-<date>.json`` and its ``.md``) and the logs go to ``bench/results/``, the logs renamed
  ``<device>-<date>-tune-<log name>`` so that runs on other cards or days do not collide.

Files already there are replaced. Nothing else is touched.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ("variants-triton.log", "variants-cuda.log", "apply-tuning.log", "variants-summary.txt", "bench.log",
        "build.log", "diag-bad-args.log", "failures.log", "kernel-metrics.log")
_DATED = re.compile(r"^(?P<tag>[a-z0-9-]+?)-(?P<date>\d{4}-\d{2}-\d{2})(?P<rest>.*)\.(json|md|png)$")


def plan(out: Path) -> list[tuple[Path, Path]]:
    """(source, destination) pairs for the run folder ``out``."""
    from sa2vp_kernels.triton import tuning

    pairs, tag, date = [], None, None
    for src in sorted(out.iterdir()):
        m = _DATED.match(src.name)
        if m and src.is_file():
            if m["tag"] == "cpu" or m["tag"].startswith("cpu-"):
                raise ValueError(f"{src.name}: results of a dry run on the CPU, not of a GPU")
            tag, date = m["tag"], m["date"]
            pairs.append((src, ROOT / "bench" / "results" / src.name))
    if tag is None:
        raise ValueError(f"{out}: no results files (<device>-<date>*.json) from bench/gpu_tune.sh")
    tuned = out / f"{tag}.json"
    if tuned.exists():
        tuning.parse(json.loads(tuned.read_text()), str(tuned))
        pairs.append((tuned, tuning.TUNED_DIR / tuned.name))
    for name in LOGS:
        log = out / name
        if log.exists():
            pairs.append((log, ROOT / "bench" / "results" / f"{tag}-{date}-tune-{name}"))
    for log in sorted(out.glob("pytest-*.log")):
        pairs.append((log, ROOT / "bench" / "results" / f"{tag}-{date}-tune-{log.name}"))
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the run's folder ($OUT of bench/gpu_tune.sh)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be copied")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        parser.error(f"{out} is not a folder")
    sys.path.insert(0, str(ROOT))
    try:
        pairs = plan(out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for src, dst in pairs:
        print(f"{src} -> {dst.relative_to(ROOT)}")
        if not args.dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    if not args.dry_run:
        print("git add " + " ".join(str(dst.relative_to(ROOT)) for _, dst in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
