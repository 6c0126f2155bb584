"""Coverage of ``convert``: the BatchNorm / add / ReLU tails a model still runs as separate ops.

A tail is counted at the ATen level, in a recorded forward pass: a ``batch_norm`` whose
output only a ``relu`` reads (``bn_relu``), or an ``add`` whose sum only a ``relu`` reads
(``add_relu``; ``bn_add_relu`` when one operand is a ``batch_norm`` output that only the
add reads, ``bn_add_bn_relu`` when both are). A frozen BatchNorm (torchvision's
``FrozenBatchNorm2d``: ``x * scale + bias`` from its buffers) counts as a ``batch_norm``. In-place ops, views and autograd's own
``detach`` are followed through the tensors' storages, so ``out += identity; relu_(out)``
counts as well as ``relu(bn(x) + r)``, and a value also read by anything else (or
returned) is not a tail.

A converted model's fused tails are single ``fused_resnet::...`` ops only on their
Triton path: on the CPU path they run ATen's own ``batch_norm`` / ``add_`` / ``relu_``
and would count as unfused. So counting a converted model needs a CUDA device, or CPU
tensors with ``TRITON_INTERPRET=1`` set before fused_resnet is imported (the kernels then
run in Triton's interpreter; keep the input small).

- :func:`count_tails`: the tails one forward pass of a model runs.
- :func:`build_model`: ``resnet50`` (torchvision), ``timm:NAME``, ``hf:resnet-50`` (a
  transformers ``ResNetModel`` from the config of microsoft/resnet-50), all built
  without weights.
- :func:`coverage` / :func:`format_coverage`: tails in the original and left unfused
  after ``convert``, in train and eval, as a table.

timm and transformers are optional (the ``test`` / ``bench`` extras); a model that needs
one that is missing, or fails to build with the installed version, gives a row that
says why instead of counts.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .common import require

__all__ = ["DEFAULT_MODELS", "HF_RESNETS", "CoverageRow", "TailCount", "build_model", "count_tails", "coverage",
           "example_input", "format_coverage", "output_tensors", "triton_path_available"]

# The models of issue 10: the ResNet family as timm, torchvision and transformers ship it; then issue 19's.
DEFAULT_MODELS = (
    "timm:seresnext26d_32x4d", "timm:ecaresnet26t", "timm:resnetrs50", "timm:resnetv2_50", "timm:regnety_002",
    "timm:regnetx_002", "timm:resnest14d", "timm:res2net50_14w_8s", "timm:skresnet18", "regnet_y_400mf",
    "regnet_x_400mf", "hf:resnet-18", "hf:resnet-50", "timm:resnet50d", "resnet50",
    # Issue 19: residuals as forward arguments (DLA, HRNet), sums of many branches (RepVGG, HRNet,
    # DPN), frozen-BatchNorm backbones of detection and segmentation.
    "timm:dla34", "timm:dla46x_c", "timm:hrnet_w18_small", "timm:dpn68", "timm:repvgg_a0", "timm:selecsls42b",
    "timm:gernet_s", "timm:res2next50", "timm:skresnext50_32x4d", "timm:resnest26d", "frozen:resnet50",
    "frozen:fasterrcnn_resnet50_fpn", "frozen:deeplabv3_resnet50",
)
# transformers ResNetModel configurations, as microsoft/resnet-N publishes them: (layer_type, depths, hidden_sizes).
HF_RESNETS = {
    "resnet-18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet-26": ("bottleneck", [2, 2, 2, 2], [256, 512, 1024, 2048]),
    "resnet-34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet-50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet-101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
    "resnet-152": ("bottleneck", [3, 8, 36, 3], [256, 512, 1024, 2048]),
}
TAIL_KINDS = ("bn_relu", "bn_add_relu", "bn_add_bn_relu", "add_relu")
_BATCH_NORM_OPS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                   "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm",
                   "batch_norm", "batch_norm_elemt"}
_RELU_OPS = {"relu", "relu_"}
_ADD_OPS = {"add", "add_"}
_RETURNED = -1  # the reader of a value the forward returns


# --------------------------------------------------------------------------- building models


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A randomly initialised model, nothing downloaded.

    ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``; ``hf:resnet-N`` (N in
    18, 26, 34, 50, 101, 152): a transformers ``ResNetModel`` with microsoft/resnet-N's
    configuration; ``frozen:NAME`` (see ``FROZEN_MODELS``): a torchvision ResNet-50 backbone with
    ``FrozenBatchNorm2d``; anything else: a torchvision classification model
    (``torchvision.models.NAME(weights=None)``). ValueError names the choices for an
    unknown name; :class:`~fused_resnet.tools.common.MissingDependency` says what to
    install for a missing package.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty name, got {name!r}")
    torch.manual_seed(seed)
    if name.startswith("timm:"):
        timm = require("timm", f"building {name}")
        model_name = name[len("timm:"):]
        if not timm.list_models(model_name):
            raise ValueError(f"unknown timm model '{model_name}' (timm {timm.__version__}); "
                             f"see timm.list_models('*resnet*')")
        return timm.create_model(model_name, pretrained=False)
    if name.startswith("hf:"):
        require("transformers", f"building {name}")
        from transformers import ResNetConfig, ResNetModel

        config_name = name[len("hf:"):]
        if config_name not in HF_RESNETS:
            raise ValueError(f"unknown transformers ResNet '{config_name}'; choose from "
                             f"{', '.join('hf:' + n for n in HF_RESNETS)}")
        layer_type, depths, hidden_sizes = HF_RESNETS[config_name]
        return ResNetModel(ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden_sizes))
    if name.startswith("frozen:"):
        return _frozen_batchnorm_model(name[len("frozen:"):])
    torchvision = require("torchvision", f"building {name}")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown model '{name}': a torchvision classification model ({', '.join(available[:6])}, "
                         f"...), 'timm:NAME' or 'hf:resnet-N'")
    return getattr(torchvision.models, name)(weights=None)


# ``frozen:NAME``: torchvision models whose ResNet-50 backbone has FrozenBatchNorm2d, as torchvision
# builds them when a backbone checkpoint is given (nothing is downloaded here).
FROZEN_MODELS = ("resnet50", "fasterrcnn_resnet50_fpn", "deeplabv3_resnet50")


def _frozen_batchnorm_model(name: str) -> nn.Module:
    """``resnet50`` with FrozenBatchNorm2d; the backbones of ``fasterrcnn_resnet50_fpn``
    (ResNet-50 + FPN) and of ``deeplabv3_resnet50`` (a dilated ResNet-50; its head's Dropout
    would make two training steps differ), their BatchNorms frozen."""
    torchvision = require("torchvision", f"building frozen:{name}")
    from torchvision.ops.misc import FrozenBatchNorm2d

    if name not in FROZEN_MODELS:
        raise ValueError(f"unknown model 'frozen:{name}'; choose from {', '.join('frozen:' + n for n in FROZEN_MODELS)}")
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if name == "fasterrcnn_resnet50_fpn":
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        backbone, body = model.backbone, model.backbone.body
    else:
        model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
        backbone = body = model.backbone
    for parent in list(body.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.load_state_dict(child.state_dict())
                setattr(parent, child_name, frozen)
    return backbone


def output_tensors(output) -> List[torch.Tensor]:
    """The tensors a model returned: a tensor, a tuple / dict, or a transformers ModelOutput."""
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def example_input(model: nn.Module, batch: int = 2, sizes: Sequence[int] = (32, 64, 96, 128, 224),
                  seed: int = 0) -> torch.Tensor:
    """A seeded ``batch x 3 x S x S`` input at the smallest ``S`` of ``sizes`` that ``model``
    accepts (tried in eval mode without gradients, which changes no state)."""
    training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    last_error: Optional[Exception] = None
    try:
        model.eval()
        for size in sizes:
            x = torch.randn(batch, 3, size, size, generator=generator).to(device)
            try:
                with torch.no_grad():
                    model(x)
                return x
            except (RuntimeError, ValueError) as exc:  # too small: a pooling or kernel larger than the map
                last_error = exc
    finally:
        model.train(training)
    raise ValueError(f"the model accepts none of the input sizes {tuple(sizes)} (last error: {last_error})")


# --------------------------------------------------------------------------- the ATen counter


@dataclass
class TailCount:
    """The BatchNorm / add / ReLU tails one forward pass ran as separate ATen ops, by kind."""

    bn_relu: int = 0
    bn_add_relu: int = 0
    bn_add_bn_relu: int = 0
    add_relu: int = 0
    places: List[str] = field(default_factory=list)  # one line per tail, in execution order
    fused_ops: int = 0  # fused_resnet::* forward ops the pass ran (0 where they took the CPU path)

    @property
    def total(self) -> int:
        return self.bn_relu + self.bn_add_relu + self.bn_add_bn_relu + self.add_relu

    def add(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.places.append(f"{kind}: {where}")


@dataclass
class _Event:
    """One ATen op of the recorded forward: what it read and the values it produced."""

    name: str  # the op's name without namespace and overload, e.g. "add_"
    namespace: str
    reads: List[Tuple[int, Optional[int]]]  # (storage, index of the event that last wrote it)
    outputs: List[int]  # storages the op wrote
    alpha_is_one: bool




class _TailRecorder(TorchDispatchMode):
    """Records every ATen op with the values it reads, following writes through storages."""

    def __init__(self):
        super().__init__()
        self.events: List[_Event] = []
        self.writer: Dict[int, int] = {}
        self.readers: Dict[Tuple[int, Optional[int]], List[int]] = defaultdict(list)
        self._alive: List[object] = []  # storages stay alive: their ids are never reused

    def storage(self, t: torch.Tensor) -> int:
        s = t.untyped_storage()
        self._alive.append(s)
        return s._cdata

    def value(self, t: torch.Tensor) -> Tuple[int, Optional[int]]:
        key = self.storage(t)
        return key, self.writer.get(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        inputs, written = [], []
        for index, argument in enumerate(schema.arguments):
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            inputs += tensors
            if argument.alias_info is not None and argument.alias_info.is_write:
                written += tensors
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        input_storages = {self.storage(t) for t in inputs}
        output_storages = [self.storage(t) for t in outputs]
        pure_alias = not written and outputs and all(s in input_storages for s in output_storages)
        event_index = len(self.events)
        reads = [self.value(t) for t in inputs]
        if not pure_alias:  # a view or detach reads nothing: who reads through it later does
            for value in reads:
                self.readers[value].append(event_index)
        new = [s for s in output_storages if s not in input_storages] + [self.storage(t) for t in written]
        for key in new:
            self.writer[key] = event_index
        namespace, _, name = schema.name.rpartition("::")
        self.events.append(_Event(name, namespace, reads, new, kwargs.get("alpha", 1) == 1))
        return out

    def mark_returned(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            self.readers[self.value(t)].append(_RETURNED)

    def only_reader(self, value: Tuple[int, Optional[int]], reader: int) -> bool:
        return self.readers.get(value) == [reader]

    def is_batch_norm_output(self, value: Tuple[int, Optional[int]]) -> bool:
        """True for the normalised output (the first output) of a batch_norm op."""
        key, producer = value
        if producer is None:
            return False
        event = self.events[producer]
        return event.name in _BATCH_NORM_OPS and event.outputs[:1] == [key]

    def produced_by(self, value: Tuple[int, Optional[int]], name: str) -> Optional[_Event]:
        """The event that wrote ``value``, when it is the op ``name``."""
        producer = value[1]
        if producer is None or self.events[producer].name != name:
            return None
        return self.events[producer]

    def is_frozen_batch_norm_output(self, value: Tuple[int, Optional[int]]) -> bool:
        """True for the output of a frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, timm's
        ``FrozenBatchNormAct2d``): ``x * scale + bias`` with ``scale = weight * rsqrt(var + eps)``
        and ``bias = b - mean * scale``, the product read by the add alone."""
        add = self.produced_by(value, "add")
        if add is None or not add.alpha_is_one or len(add.reads) < 2:
            return False
        product = self.produced_by(add.reads[0], "mul")
        if product is None or not self.only_reader(add.reads[0], value[1]) or len(product.reads) < 2:
            return False
        scale = self.produced_by(product.reads[1], "mul")
        shift = self.produced_by(add.reads[1], "sub")
        return (scale is not None and shift is not None and len(scale.reads) == 2
                and self.produced_by(scale.reads[1], "rsqrt") is not None)

    def is_norm_output(self, value: Tuple[int, Optional[int]]) -> bool:
        return self.is_batch_norm_output(value) or self.is_frozen_batch_norm_output(value)

    def tails(self) -> TailCount:
        count = TailCount(fused_ops=sum(e.namespace == "fused_resnet" for e in self.events))
        for index, event in enumerate(self.events):
            if event.name not in _RELU_OPS or not event.reads:
                continue
            value = event.reads[0]
            producer = value[1]
            if producer is None or not self.only_reader(value, index):
                continue
            if self.is_norm_output(value):
                count.add("bn_relu", f"ops {producer} -> {index}")
                continue
            add = self.events[producer]
            if add.name not in _ADD_OPS or not add.alpha_is_one or value[0] not in add.outputs:
                continue
            bns = sum(1 for operand in add.reads[:2]
                      if self.is_norm_output(operand) and self.only_reader(operand, producer))
            count.add(("add_relu", "bn_add_relu", "bn_add_bn_relu")[bns], f"ops {producer} -> {index}")
        return count


def triton_path_available(device: Optional[torch.device] = None) -> bool:
    """True when the fused ops on ``device``'s float32 tensors run their Triton kernels (CUDA,
    or CPU with TRITON_INTERPRET=1): only there does a fused tail show as one op."""
    from fused_resnet import backend

    return backend.use_triton(torch.empty(0, device=device or "cpu"))


def count_tails(model: nn.Module, x: torch.Tensor, training: bool, fake: bool = True) -> TailCount:
    """The tails one forward pass of ``model`` on ``x`` runs as separate ATen ops.

    ``model`` runs in training or eval mode as asked (its modes are restored after),
    without gradients, and its parameters and buffers are never written: with ``fake``
    (the default) they and ``x`` are replaced by fake tensors (``FakeTensorMode``) for the
    pass, so every op, the fused ones included, runs only its shape function: the pass
    costs no compute (the Triton interpreter takes minutes for a training-mode
    ResNet-50) and records the same ops. Without ``fake`` a deep copy of ``model`` runs
    for real. Count a converted model where :func:`triton_path_available` is True.
    """
    recorder = _TailRecorder()
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            state = {name: fake_mode.from_tensor(t) for name, t in
                     [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
            fake_x = fake_mode.from_tensor(x)
            with fake_mode, torch.no_grad(), recorder:
                out = torch.func.functional_call(model, state, (fake_x,))
        else:
            with torch.no_grad(), recorder:
                out = copy.deepcopy(model)(x)
    finally:
        for m, mode in modes:
            m.training = mode
    recorder.mark_returned(output_tensors(out))
    return recorder.tails()


# --------------------------------------------------------------------------- the table


@dataclass
class CoverageRow:
    """One model: tails in the original and left unfused after convert, in train and eval."""

    model: str
    input_shape: Optional[Tuple[int, ...]] = None
    original: Dict[str, TailCount] = field(default_factory=dict)  # "train" / "eval"
    converted: Dict[str, TailCount] = field(default_factory=dict)
    report_summary: str = ""
    error: Optional[str] = None  # why the model has no counts (it did not build, or convert raised)


def coverage(models: Sequence[str] = DEFAULT_MODELS, batch: int = 2, seed: int = 0) -> List[CoverageRow]:
    """For each model name (see :func:`build_model`): the tails in the original and left
    unfused after ``fused_resnet.convert``, train and eval, at the smallest input of
    :func:`example_input`. Needs the Triton path (see the module docstring)."""
    from fused_resnet.convert import convert

    if not triton_path_available():
        raise RuntimeError("coverage needs the fused ops on their Triton path, where a fused tail is one op: "
                           "set TRITON_INTERPRET=1 before fused_resnet is imported (CPU), or run on a CUDA device")
    rows = []
    for name in models:
        row = CoverageRow(name)
        rows.append(row)
        try:
            original = build_model(name, seed)
        except Exception as exc:  # noqa: BLE001 - a family that does not build is a row saying why
            row.error = f"does not build: {type(exc).__name__}: {exc}"
            continue
        step = "finding an input size"
        try:
            x = example_input(original, batch=batch, seed=seed)
            row.input_shape = tuple(x.shape)
            step = "convert"
            converted = convert(copy.deepcopy(original))
            row.report_summary = converted.fused_resnet_report.summary()
            step = "counting"
            for mode, training in (("train", True), ("eval", False)):
                row.original[mode] = count_tails(original, x, training)
                row.converted[mode] = count_tails(converted, x, training)
        except Exception as exc:  # noqa: BLE001 - one model's failure is its row, not the table's
            row.error = f"{step} raised {type(exc).__name__}: {exc}"
            row.original, row.converted = {}, {}
    return rows


def format_coverage(rows: Sequence[CoverageRow]) -> str:
    """The coverage table in Markdown: tails in the original and left unfused, train / eval."""
    lines = ["| model | input | tails in the original (train / eval) | left unfused after convert (train / eval) |",
             "| --- | --- | --- | --- |"]
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.model} | - | skipped: {row.error} | - |")
            continue
        shape = "x".join(str(d) for d in row.input_shape)
        original = " / ".join(str(row.original[m].total) for m in ("train", "eval"))
        left = " / ".join(str(row.converted[m].total) for m in ("train", "eval"))
        lines.append(f"| {row.model} | {shape} | {original} | {left} |")
    return "\n".join(lines)
