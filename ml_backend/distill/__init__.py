"""Distillation: dataset export, training, evaluation, ONNX export, and the labelling-effort measure."""
