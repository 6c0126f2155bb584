"""``python -m fused_resnet`` and the ``fused-resnet`` console script: see :mod:`fused_resnet.tools.cli`."""
import os
import sys

from .tools.cli import main

__all__ = ["main"]


def _drop_checkout_from_path() -> None:
    """``python -m`` run from the checkout puts it first on ``sys.path``, where its top-level
    ``kernels/`` (installed as ``fused_resnet.kernels``) would shadow Hugging Face's ``kernels``
    package, which transformers imports."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, "kernels", "__init__.py")):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]


if __name__ == "__main__":
    _drop_checkout_from_path()
    sys.exit(main())
