"""fused-resnet: Triton kernels that fuse the BatchNorm / add / ReLU tail of ResNet blocks,
behind drop-in ``torch.nn`` modules and a one-call ``convert(model)``."""
from . import export, functional, nn
from .convert import ConversionReport, convert
from .fold_bn import fold_bn
from .functional import (add_relu, bn_add_bn_relu, bn_add_relu, bn_relu, sync_bn_add_bn_relu, sync_bn_add_relu,
                         sync_bn_relu)
from .nn import (BatchNormAddReLU2d, BatchNormReLU2d, FusedBasicBlock, FusedBottleneck, FusedResidual,
                 SyncBatchNormAddReLU2d, SyncBatchNormReLU2d, convert_sync_batchnorm)

__version__ = "0.1.0"

__all__ = ["BatchNormAddReLU2d", "BatchNormReLU2d", "ConversionReport", "FusedBasicBlock", "FusedBottleneck",
           "FusedResidual", "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d", "add_relu", "bn_add_bn_relu",
           "bn_add_relu", "bn_relu", "convert", "convert_sync_batchnorm", "export", "fold_bn", "functional", "nn",
           "sync_bn_add_bn_relu", "sync_bn_add_relu", "sync_bn_relu"]
