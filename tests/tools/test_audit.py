"""The memory-traffic audit: byte counting of Triton launches and of eager ATen ops.

Interpreter-marked tests count real kernel launches (TRITON_INTERPRET=1 process); the
others need no interpreter: eager counting, and the ``fused-resnet audit`` command, which
re-runs itself under the interpreter in a child process.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fused_resnet.tools import audit, common, traffic

SMALL = (2, 64, 4, 4)


# --------------------------------------------------------------------------- kernels, interpreter


@pytest.mark.interpreter
def test_counter_counts_unique_unmasked_bytes_per_buffer():
    from fused_resnet.kernels import add_relu_forward
    from triton.runtime import interpreter

    a, b = torch.randn(1500), torch.randn(1500)  # 1500: the last block of 1024 lanes is partly masked off
    call_before = interpreter.GridExecutor.__call__
    with traffic.TritonTrafficCounter() as counter:
        y = add_relu_forward(a, b)
    assert [launch.kernel for launch in counter.launches] == ["add_relu_forward_kernel"]
    by_name = {buf.names: buf for buf in counter.launches[0].buffers}
    assert (by_name["a_ptr"].read, by_name["a_ptr"].written) == (1500 * 4, 0)
    assert (by_name["b_ptr"].read, by_name["b_ptr"].written) == (1500 * 4, 0)
    assert (by_name["y_ptr"].read, by_name["y_ptr"].written) == (0, 1500 * 4)
    torch.testing.assert_close(y, torch.relu(a + b))
    # The interpreter is left as it was found.
    assert interpreter.GridExecutor.__call__ is call_before
    assert "create_masked_load" not in vars(interpreter.interpreter_builder)


@pytest.mark.interpreter
@pytest.mark.parametrize("op,pass_", [(op, p) for op, passes in common.FUSED_BUDGET.items() for p in passes])
def test_fused_kernels_meet_the_design_budget_and_eager_its_expected_traffic(op, pass_):
    a = audit.audit_op(op, pass_, SMALL)
    figures = a.figures()
    assert figures["fused"] == pytest.approx(common.FUSED_BUDGET[op][pass_], abs=1e-9), a.kernel_launches
    assert figures["eager_implementation"] == pytest.approx(common.EAGER_BUDGET[op][pass_], abs=1e-9), a.eager_ops
    assert a.fused_aten.activation == 0  # nothing activation-sized moves outside the kernels


@pytest.mark.interpreter
@pytest.mark.parametrize("op,pass_", [("bn_add_bn_relu", "forward_train"), ("bn_add_bn_relu", "backward_train"),
                                      ("add_relu", "forward_eval"), ("add_relu", "backward_eval")])
def test_unbudgeted_training_ops_reach_the_minimum(op, pass_):
    assert audit.audit_op(op, pass_, SMALL).figures()["fused"] == pytest.approx(common.MINIMUM[op][pass_], abs=1e-9)


@pytest.mark.interpreter
def test_ratios_do_not_depend_on_shape_or_layout():
    shapes = [((2, 64, 4, 4), True), ((3, 128, 5, 7), False), ((1, 64, 3, 3), True)]
    figures = [audit.audit_op("bn_add_relu", "backward_train", s, channels_last=cl).figures() for s, cl in shapes]
    for key in ("fused", "fused_read", "fused_written", "eager_one_pass", "eager_implementation"):
        assert len({round(f[key], 9) for f in figures}) == 1, key


# --------------------------------------------------------------------------- eager, no interpreter


def test_eager_counts_each_op_and_batch_norms_second_pass():
    traffic, ops = audit.eager_traffic("bn_add_relu", "forward_train", SMALL)
    T = 4 * 2 * 64 * 4 * 4
    assert [op.name for op in ops] == ["aten.add_.Tensor", "aten.native_batch_norm.default", "aten.add_.Tensor",
                                       "aten.relu_.default"]
    # native_batch_norm: x in, y out; add_: y and r in, y out; relu_: y in and out.
    assert (traffic.activation_read, traffic.activation_written) == (4 * T, 3 * T)
    assert traffic.extra_activation_read == T  # training statistics: x is read a second time
    backward, _ = audit.eager_traffic("bn_relu", "backward_eval", SMALL, channels_last=False)
    assert (backward.activation, backward.extra_activation_read) == (6 * T, T)  # eval: grad re-read only


def test_counting_kernels_needs_the_interpreter():
    if traffic.interpreter_active():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with traffic.TritonTrafficCounter():
            pass


def test_unknown_op_or_pass_is_named():
    with pytest.raises(ValueError, match="unknown op 'bn_gelu'"):
        audit.eager_traffic("bn_gelu", "forward_train", SMALL)
    with pytest.raises(ValueError, match="op 'add_relu' has no pass 'forward_train'"):
        audit.eager_traffic("add_relu", "forward_train", SMALL)


def test_audit_command_runs_itself_in_the_interpreter(tmp_path):
    if traffic.interpreter_active():
        pytest.skip("covered by the PyTorch-path process")
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "fused_resnet", "audit", "--model", "resnet18", "--gpu", "H200",
                           "--json", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Over the design budget: none" in proc.stdout
    assert "PROJECTION, not a measurement" in proc.stdout and "H200" in proc.stdout
    data = json.loads(out.read_text())
    stages = {(s["model"], s["stage"], s["pass_"]): s for s in data["stages"]}
    assert {stage for _, stage, _ in stages} == {"stem", "layer1", "layer2", "layer3", "layer4"}
    # layer1 of resnet18 at batch 256, 224x224, fp32: 2 blocks x (bn_relu 3T + bn_add_relu 4T) in training.
    T = 256 * 64 * 56 * 56 * 4
    assert stages[("resnet18", "layer1", "forward_train")]["fused"] == pytest.approx(2 * 7 * T)
    assert stages[("resnet18", "layer1", "forward_train")]["eager_implementation"] == pytest.approx(2 * 13 * T)
    # Every figure says which kernel plans it used; today none changes traffic with the shape.
    assert data["traffic_plan_fields"] == {"reduction": [], "elementwise": []}
    assert {s["plan_basis"] for s in data["stages"]} == {"scaled"}
    plan = stages[("resnet18", "layer1", "forward_train")]["plans"][0]
    assert plan["real_shape"] == [256, 64, 56, 56] and plan["measured_shape"] == [2, 64, 4, 4]
    assert {"block_c", "num_partials"} <= set(plan["real_plans"]["reduction"])
    assert "small-shape plan, same traffic" in proc.stdout


# --------------------------------------------------------------------------- kernel plans


def test_plan_choice_scales_when_no_plan_field_changes_traffic():
    choice = audit.plan_choice("bn_relu", (256, 64, 56, 56))
    assert choice.basis == "scaled" and choice.measured_shape == (2, 64, 4, 4)
    # The plans do differ, in tiling: that is what the figure states.
    assert choice.real_plans["reduction"]["num_partials"] != choice.measured_plans["reduction"]["num_partials"]


def test_plan_choice_measures_with_the_real_shapes_plan_when_it_changes_traffic(monkeypatch):
    # Pretend blocks_per_span changed traffic: 8 at 56x56, 1 at 4x4, 4 at 8x8, 8 again at 16x16.
    monkeypatch.setattr(audit, "TRAFFIC_PLAN_FIELDS", {"reduction": ("blocks_per_span",), "elementwise": ()})
    choice = audit.plan_choice("bn_relu", (256, 64, 56, 56))
    assert choice.basis == "real_plan" and choice.measured_shape == (2, 64, 16, 16)
    assert choice.measured_plans["reduction"]["blocks_per_span"] == choice.real_plans["reduction"]["blocks_per_span"]
    # No shape within MAX_MATCHED_ELEMENTS gets 25 spans per image: the figure is flagged, not trusted.
    monkeypatch.setattr(audit, "TRAFFIC_PLAN_FIELDS", {"reduction": ("spans_per_image",), "elementwise": ()})
    assert audit.plan_choice("bn_relu", (256, 64, 56, 56)).basis == "unmatched"


# --------------------------------------------------------------------------- blocks, convolutions included


@pytest.mark.interpreter
def test_conv_bottleneck_view_counts_convolutions_on_both_sides():
    audits = audit.audit_conv_bottleneck(inplanes=16, planes=4, shape_hw=4, batch=1)
    assert [a.pass_ for a in audits] == ["forward", "forward_backward"]
    for a in audits:
        # The per-op breakdown accounts for every byte of the totals.
        assert sum(a.fused_breakdown.values()) == a.fused
        assert sum(a.eager_breakdown.values()) == a.eager_implementation
        assert any(name.startswith("conv1x1") for name in a.fused_breakdown)
        assert "aten.convolution.default" in a.fused_breakdown  # conv2's 3x3 stays an ATen convolution
        assert "aten.convolution.default" in a.eager_breakdown
    forward, both = audits
    assert "aten.convolution_backward.default" in both.eager_breakdown
    assert forward.ratio < 1.0  # the fused forward moves fewer bytes than eager, weights included
    # Bytes are deterministic: a second count gives the same numbers.
    again = audit.audit_conv_bottleneck(inplanes=16, planes=4, shape_hw=4, batch=1)
    assert [(a.fused, a.eager_implementation) for a in again] == [(a.fused, a.eager_implementation) for a in audits]
    assert "fused/eager" in audit.format_block_table(audits)


@pytest.mark.parametrize("kwargs,match", [({"planes": 0}, "planes"), ({"shape_hw": 2.5}, "shape_hw"),
                                          ({"downsample": False, "inplanes": 64, "planes": 64}, "inplanes")])
def test_conv_bottleneck_view_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        audit.audit_conv_bottleneck(**kwargs)
