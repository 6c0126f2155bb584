"""Functional fused ops: the ``torch.nn.functional`` of fused-resnet."""
from .add_relu import add_relu
from .bn_add_relu import bn_add_bn_relu, bn_add_relu, bn_relu
from .sync_batchnorm import sync_bn_add_bn_relu, sync_bn_add_relu, sync_bn_relu

__all__ = ["add_relu", "bn_add_bn_relu", "bn_add_relu", "bn_relu", "sync_bn_add_bn_relu", "sync_bn_add_relu",
           "sync_bn_relu"]
