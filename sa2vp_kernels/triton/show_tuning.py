"""Show the Triton launch settings tuned for this GPU model, or check a tuned-settings file.

    python -m sa2vp_kernels.triton.show_tuning            # what applies on this machine's GPU
    python -m sa2vp_kernels.triton.show_tuning FILE.json  # check a file and list its entries

Exit status 1 with the error (file and key named) when the file is malformed.
"""
from __future__ import annotations

import argparse
import sys

from .tuning import describe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sa2vp_kernels.triton.show_tuning",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="a tuned-settings file to check (default: the one in force)")
    args = parser.parse_args(argv)
    try:
        print(describe(args.file))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
