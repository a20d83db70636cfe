"""``python -m sa2vp``: the same command line as ``sa2vp`` (``torchrun -m sa2vp train ...``)."""
import sys

from .cli import main

sys.exit(main())
