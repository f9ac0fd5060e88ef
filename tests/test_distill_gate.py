"""`prelabel distill` hands over no useless student quietly (the quality gate: exit status 3, the model card says
so, the files are kept), training's thread setting, and the exported ONNX model against the contract README
documents."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.distill.synthetic import generate

from .test_distill import write_teacher

SIZE = 64
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    generate(root, 20, seed=5, size=(SIZE, SIZE))
    write_teacher(root)  # finds every circle and square exactly: mAP@0.5 about 2/3
    return root


def one_epoch(root: Path, out: Path, *extra: str):
    """A run far too short to learn anything: one epoch on 16 small images."""
    args = ["distill", "--coco", str(root / "annotations.json"), "--images", str(root / "images"), "--out", str(out),
            "--image-size", str(SIZE), "--pretrained", "scratch", "--epochs", "1", "--batch-size", "8", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def failed_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("failed")
    return out, one_epoch(data, out)


def test_a_too_short_run_fails_the_quality_gate_with_status_3_and_keeps_the_student(failed_run):
    out, result = failed_run
    assert result.exit_code == 3, result.output
    assert "the student did not pass the quality gate" in result.output
    assert "is below --min-map 0.2" in result.output and "train longer" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["passed"] is False and report["student"]["map50"] < 0.2
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Did not pass the quality gate" in card and "is below --min-map 0.2" in card
    for name in ("model.pt", "model.onnx", "student.json"):  # nothing the user made is lost
        assert (out / name).exists(), name


@pytest.mark.parametrize("extra, status, needle", [
    (["--min-map", "0"], 0, "quality gate passed"),
    (["--min-map", "0", "--predictions", "{teacher}"], 3, "is below 0.5 x the teacher's"),
    (["--min-map", "0", "--min-vs-teacher", "0", "--predictions", "{teacher}"], 0, "quality gate passed"),
])
def test_the_gate_judges_against_min_map_and_the_teacher_and_each_check_turns_off(data, tmp_path, extra, status,
                                                                                  needle):
    extra = [a.format(teacher=data / "teacher.json") for a in extra]
    result = one_epoch(data, tmp_path, "--no-export", *extra)
    assert result.exit_code == status, result.output
    assert needle in result.output.replace("\n", " ")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quality"]["passed"] is (status == 0)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert ("Quality gate: passed" in card) is (status == 0)


def test_training_uses_the_threads_asked_for_and_gives_the_callers_back(data, tmp_path):
    before = torch.get_num_threads()
    result = one_epoch(data, tmp_path, "--no-export", "--min-map", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report.json").read_text())["training"]["threads"] == 1
    assert torch.get_num_threads() == before


@pytest.mark.slow  # starts the CLI in a subprocess (the full suite runs it)
def test_the_cli_makes_openmp_wait_passively_before_torch_loads():
    """In a fresh process, as `prelabel distill` runs: the policy is set before torch is imported (here the command
    stops at a usage error, after setting it), and a later call, torch loaded, changes nothing."""
    code = ("import os, sys\nfrom ml_backend.cli import app\nsys.argv = ['prelabel', 'distill']\ntry:\n    app()\n"
            "except SystemExit as exit:\n    print(exit.code)\nprint(os.environ.get('OMP_WAIT_POLICY'))\n"
            "import torch\nfrom ml_backend.distill import wait_passively\nprint(wait_passively())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "PASSIVE", "False"], done.stdout + done.stderr


def documented_contract() -> dict[str, tuple[str, str, list[str]]]:
    """README's table under "The student's ONNX contract": name -> (input/output, dtype, shape tokens)."""
    text = README.read_text()
    section = text[text.index("### The student's ONNX contract"):]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| (input|output) \| `(\w+)` \| (\w+) \| ([^|]+) \|$", section, re.M)
    return {name: (kind, dtype, shape.split(" x ")) for kind, name, dtype, shape in rows}


def test_the_exported_onnx_model_matches_the_contract_in_the_readme(failed_run):
    import onnxruntime as ort

    from ml_backend.models.student import StudentConfig, letterbox, load_student_weights

    out, _ = failed_run
    config = StudentConfig.load(out)
    contract = documented_contract()
    assert list(contract) == ["images", "boxes", "scores"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    n = sum(math.ceil(config.image_size / s) ** 2 for s in (8, 16, 32))  # README: N = ⌈S/8⌉² + ⌈S/16⌉² + ⌈S/32⌉²
    values = {"S": config.image_size, "N": n, "C": len(config.classes), "3": 3, "4": 4}
    onnx_types = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}
    (images,) = session.get_inputs()
    kind, dtype, shape = contract[images.name]
    assert kind == "input" and onnx_types[dtype] == images.type and shape[0] == "B"
    assert isinstance(images.shape[0], str) and images.shape[1:] == [values[t] for t in shape[1:]]  # a free batch
    batch = np.zeros((2, 3, SIZE, SIZE), np.uint8)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {images.name: batch})))
    for arg in session.get_outputs():
        kind, dtype, shape = contract[arg.name]
        assert kind == "output" and onnx_types[dtype] == arg.type, arg
        assert list(outputs[arg.name].shape) == [2] + [values[t] for t in shape[1:]], (arg.name, shape)

    # top-left letterbox, filled with 0
    wide = np.full((SIZE // 2, SIZE, 3), 200, np.uint8)
    boxed, scale = letterbox(wide, SIZE)
    assert scale == 1 and (boxed[:, : SIZE // 2] == 200).all() and (boxed[:, SIZE // 2 :] == 0).all()

    # scores: sqrt(sigmoid(class logit) x sigmoid(centerness)), one column per class in student.json's order
    _, model = load_student_weights(out)
    batch = np.stack([boxed, boxed[:, ::-1].copy()])
    (scores,) = session.run(["scores"], {"images": batch})
    mean = torch.tensor(model.transform.image_mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.transform.image_std).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        x = (torch.from_numpy(batch).float() - mean) / std
        head = model.head(list(model.backbone(x).values()))
        expected = torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"])).numpy()
    assert scores.shape[-1] == len(config.classes)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    assert 0 <= scores.min() and scores.max() <= 1
