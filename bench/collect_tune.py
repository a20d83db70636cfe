#!/usr/bin/env python3
"""Bring the results of a `make gpu-tune` run (its $OUT folder, copied back from the GPU machine) into the
repository, ready to commit.

    python3 bench/collect_tune.py OUT            # copies, then prints what to commit
    python3 bench/collect_tune.py OUT --dry-run  # prints what it would copy

* the tuned file (``<device>.json`` in tuning.py's format) goes to ``sa2vp_kernels/triton/tuned/``,
  after the same check the package applies;
* the variants' results (``<device>-<date>-variants-*.json``), the benchmarks' results file
  (``<device>-<date>.json`` and its ``.md``) and the logs (loose, or in the run's ``logs.tar.gz``) go to
  ``bench/results/`` as ``<device>-<date>-tune[-variants-*].json``, ``<device>-<date>-tune.md`` and
  ``<device>-<date>-tune-<log name>``. Where another run of the same card and day is already there
  (other contents under those names), this run's names take ``-tune2``, ``-tune3``, ...: no earlier
  results are replaced. Collecting the same run again rewrites the same files.

Nothing else is touched.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ("variants-triton.log", "variants-cuda.log", "apply-tuning.log", "variants-summary.txt", "bench.log",
        "build.log", "diag-bad-args.log", "failures.log", "kernel-metrics.log")
_DATED = re.compile(r"^(?P<tag>[a-z0-9-]+?)-(?P<date>\d{4}-\d{2}-\d{2})(?P<rest>.*)\.(json|md|png)$")
ARCHIVE = "logs.tar.gz"  # bench/pack_logs.sh packs a run's logs into it (the device tool brings back 8 files)


def _is_log(name: str) -> bool:
    return name in LOGS or re.fullmatch(r"pytest-[\w.-]+\.log", name) is not None


def _logs(out: Path) -> dict[str, bytes]:
    """The run's logs by name: the members of its log archive, then loose files."""
    logs = {}
    if (out / ARCHIVE).is_file():
        with tarfile.open(out / ARCHIVE, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and "/" not in member.name and _is_log(member.name):
                    logs[member.name] = tar.extractfile(member).read()
    for path in out.iterdir():
        if path.is_file() and _is_log(path.name):
            logs[path.name] = path.read_bytes()
    return logs


def plan(out: Path) -> list[tuple[bytes, Path, str]]:
    """(contents, destination, source name) for the run folder ``out``."""
    from sa2vp_kernels.triton import tuning

    dated, tag, date = [], None, None
    for src in sorted(out.iterdir()):
        m = _DATED.match(src.name)
        if m and src.is_file():
            if m["tag"] == "cpu" or m["tag"].startswith("cpu-"):
                raise ValueError(f"{src.name}: results of a dry run on the CPU, not of a GPU")
            if tag is not None and (m["tag"], m["date"]) != (tag, date):
                raise ValueError(f"{out}: results of two runs ({tag}-{date} and {m['tag']}-{m['date']})")
            tag, date = m["tag"], m["date"]
            dated.append((src, m["rest"], src.suffix))
    if tag is None:
        raise ValueError(f"{out}: no results files (<device>-<date>*.json) from bench/gpu_tune.sh")
    files = [(src.read_bytes(), rest + suffix, src.name) for src, rest, suffix in dated]
    files += [(data, f"-{name}", name) for name, data in sorted(_logs(out).items())]
    results = ROOT / "bench" / "results"
    for n in range(1, 1000):
        prefix = f"{tag}-{date}-tune{n if n > 1 else ''}"
        pairs = [(data, results / f"{prefix}{rest}", name) for data, rest, name in files]
        if all(not dst.exists() or dst.read_bytes() == data for data, dst, _ in pairs):
            break
    else:
        raise ValueError(f"{results}: no free name for this run ({tag}-{date}-tune1..999 all taken)")
    tuned = out / f"{tag}.json"
    if tuned.exists():
        tuning.parse(json.loads(tuned.read_text()), str(tuned))
        pairs.append((tuned.read_bytes(), tuning.TUNED_DIR / tuned.name, tuned.name))
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
    for data, dst, name in pairs:
        print(f"{out / name} -> {dst.relative_to(ROOT)}")
        if not args.dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(dst)
    if not args.dry_run:
        print("git add " + " ".join(str(dst.relative_to(ROOT)) for _, dst, _ in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
