"""`prelabel up --tiny-models` on a folder of awkward images: square, thin and 1-pixel images are pre-annotated, a
corrupt one fails alone, printed once, and waits in Label Studio's "prelabel: failed" tab with its cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ml_backend.labelstudio.annotate import ERROR_KEY

from .conftest import encode, free_port, make_image
from .test_up import run_up, stop

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]  # `prelabel up` starts Label Studio in its subprocess


def test_up_isolates_a_corrupt_image_and_takes_images_of_any_shape(tmp_path):
    images = tmp_path / "odd"
    images.mkdir()
    for name, (h, w) in {"square.png": (300, 300), "tall-thin.png": (1000, 20), "one-pixel-high.png": (1, 200)}.items():
        pixels = np.random.default_rng(h).integers(0, 255, (h, w, 3), dtype=np.uint8)
        (images / name).write_bytes(encode(Image.fromarray(pixels)))
    (images / "corrupt.png").write_bytes(encode(make_image(80, 60))[:70])
    model_dir = tmp_path / ".prelabel"
    data_dir = model_dir / "label-studio"
    port, backend_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    process, ready, lines = run_up(images, model_dir, port, backend_port)
    try:
        output = "".join(lines)
        assert "3 pre-annotated" in ready and "1 failed" in ready, output
        assert "Traceback" not in output and output.count("corrupt.png") == 1, output
        (failure,) = [line for line in lines if "corrupt.png" in line]
        assert "corrupt or truncated" in failure
        client = LabelStudio(base_url=url, api_key=json.loads((data_dir / "prelabel-credentials.json").read_text())["token"])
        (project,) = client.projects.list()
        (link,) = [line.split(": ", 1)[1].strip() for line in lines if line.startswith("failed tasks (Data Manager tab): ")]
        assert link.startswith(f"{url}/projects/{project.id}/data?tab=")
        (failed,) = client.tasks.list(project=project.id, view=int(link.rsplit("=", 1)[1]))
        assert failed.data["image"].endswith("corrupt.png") and "corrupt or truncated" in failed.data[ERROR_KEY]
    finally:
        stop(process, lines)
