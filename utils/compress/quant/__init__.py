"""INT8 quantization beyond ONNX Runtime's post-training path.

* :mod:`utils.compress.quant.quantizer`: where fake quantization goes (TensorRT's explicit-quantization placement: the
  inputs and weights of every convolution, symmetric INT8) as a torchao PT2E ``Quantizer``.
* :mod:`utils.compress.quant.qat`: quantization-aware training: a detector exported with ``torch.export``, prepared with
  torchao's ``prepare_qat_pt2e`` and wrapped so the training loop, the EMA, validation and checkpoints see the
  usual YOLO model interface; rebuilt from plain data when a checkpoint is loaded; converted to a QDQ ONNX.
* :mod:`utils.compress.quant.sensitivity`: per-layer INT8 sensitivity of a float model, measured on real images, which
  ``export.py --int8-keep N`` uses to keep the N layers that hurt most in FP32.
"""
