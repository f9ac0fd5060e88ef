"""Distillation: the training split and its COCO files (`dataset`), training (`train`), ONNX export and the model
card (`onnx_export`), the whole run with the student-vs-teacher evaluation (`run`) and synthetic data (`synthetic`).
The labelling-effort measure is in the core (`ml_backend.effort`)."""

import os
import sys


def wait_passively() -> bool:
    """Sets `OMP_WAIT_POLICY=PASSIVE` (unless the user chose a policy) so that torch's OpenMP threads sleep rather
    than spin while they wait for each other: with another process busy on the CPU, spinning threads steal the time
    the thread they wait for needs, and a training epoch takes many times longer. OpenMP reads the variable once,
    when torch loads: False (and nothing set) when torch is already loaded."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True
