"""``python -m fused_resnet`` and the ``fused-resnet`` console script: see :mod:`fused_resnet.cli`."""
import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
