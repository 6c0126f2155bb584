"""fused-resnet: Triton kernels that fuse the BatchNorm / add / ReLU tail of ResNet blocks."""
from . import functional
from .functional import add_relu, bn_add_bn_relu, bn_add_relu, bn_relu

__version__ = "0.1.0"

__all__ = ["add_relu", "bn_add_bn_relu", "bn_add_relu", "bn_relu", "functional"]
