"""``python -m fused_resnet`` and the ``fused-resnet`` console script: see :mod:`fused_resnet.tools.cli`."""
import sys

from .tools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
