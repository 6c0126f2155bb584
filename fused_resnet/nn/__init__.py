"""Drop-in ``torch.nn`` modules whose BatchNorm / add / ReLU tails run as fused ops."""
from .batchnorm import BatchNormAddReLU2d, BatchNormReLU2d
from .blocks import FusedBasicBlock, FusedBottleneck, FusedConvBottleneck, FusedResidual
from .frozen_batchnorm import fused_frozen_batchnorm, is_frozen_batchnorm
from .sync_batchnorm import SyncBatchNorm2d, SyncBatchNormAddReLU2d, SyncBatchNormReLU2d, convert_sync_batchnorm

__all__ = ["BatchNormAddReLU2d", "BatchNormReLU2d", "FusedBasicBlock", "FusedBottleneck", "FusedConvBottleneck",
           "FusedResidual", "SyncBatchNorm2d", "SyncBatchNormAddReLU2d", "SyncBatchNormReLU2d", "convert_sync_batchnorm",
           "fused_frozen_batchnorm", "is_frozen_batchnorm"]
