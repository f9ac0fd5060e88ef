"""Distillation: the training split and its COCO files (`dataset`), training (`train`), ONNX export and the model
card (`onnx_export`), the whole run with the student-vs-teacher evaluation (`run`) and synthetic data (`synthetic`).
The labelling-effort measure is in the core (`ml_backend.effort`)."""
