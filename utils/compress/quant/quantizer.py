"""Where fake quantization goes: TensorRT's explicit-quantization placement, as a torchao PT2E quantizer.

TensorRT builds an INT8 engine from a QDQ ONNX without a calibrator when every quantized tensor is signed
8-bit with a zero point of 0: activations per tensor, weights per output channel (axis 0). It then fuses each
``DequantizeLinear -> Conv`` into an INT8 convolution and propagates the scales through pooling, resizing and
concatenation itself, so only the inputs and the weights of convolutions (and linear layers) need
quantizers; SiLU, additions and concatenations are left to the runtime. OpenVINO's CPU plugin reads the same
placement as INT8 convolutions. ONNX Runtime's QDQ fusion instead wants a quantizer on every output (see
``utils/export/quantize.py``), which is why the post-training path there places them differently.

Ranges follow a moving average (factor 0.01, torch's QAT default) of each batch's min/max for activations
and of each output channel's min/max for weights; both are symmetric, so zero points stay 0 and an
exponential moving average of the scales (the trainer's EMA model) stays a valid quantizer.
"""

from __future__ import annotations

from typing import Any

import torch

SCHEME = "int8 symmetric: activations per tensor [-128, 127], weights per output channel [-127, 127]"
PLACEMENT = "inputs and weights of every convolution and linear layer (TensorRT explicit quantization)"


def _specs() -> tuple[Any, Any]:
    from torchao.quantization.pt2e import (
        FusedMovingAvgObsFakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
    )
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    activation = QuantizationSpec(
        dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, averaging_constant=0.01))
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=0.01))
    return activation, weight


def tensorrt_quantizer() -> Any:
    """A torchao ``Quantizer`` that annotates the input and the weight of every conv2d and linear node."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    activation, weight = _specs()
    targets = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}

    class TensorRTPlacementQuantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target not in targets:
                    continue
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: activation, node.args[1]: weight}, _annotated=True)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            return None

    return TensorRTPlacementQuantizer()

