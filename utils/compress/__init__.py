"""Model compression: channel pruning (prune/), INT8 quantization (quant/), sparse training and distillation
(training plug-ins)."""
