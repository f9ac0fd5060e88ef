"""The `prelabel` command: serve with tiny models, fail fast on missing weights, original SAM checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from .conftest import free_port, make_image


def run_cli(*args, timeout=120, **env):
    environment = os.environ | {"HF_HUB_OFFLINE": "1"} | env
    return subprocess.run([sys.executable, "-m", "ml_backend.cli", *args], env=environment, capture_output=True, text=True, timeout=timeout)


def test_serve_starts_with_tiny_models_and_answers_health(tiny_models, tmp_path):
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(tmp_path)}
    args = ["serve", "--port", str(port), "--detector", str(tiny_models["detector"]), "--segmenter", str(tiny_models["segmenter"])]
    process = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.3)
        else:
            pytest.fail("prelabel serve did not answer /health within 60 s")
        assert health["status"] == "UP" and health["detector"] == str(tiny_models["detector"])
    finally:
        process.terminate()
        process.wait(10)


def test_serve_fails_at_once_with_one_line_when_weights_are_missing(tmp_path):
    start = time.monotonic()
    done = run_cli("serve", "--detector", "IDEA-Research/grounding-dino-base", HF_HOME=str(tmp_path), MODEL_DIR=str(tmp_path))
    assert done.returncode == 2 and time.monotonic() - start < 30
    assert "error: 2 models are missing" in done.stderr  # both named at once, not one per run
    assert "detector: model 'IDEA-Research/grounding-dino-base' is not in the local cache" in done.stderr
    assert "segmenter: model 'facebook/sam-vit-base' is not in the local cache" in done.stderr
    assert "MODEL_DIR" in done.stderr


@pytest.mark.slow  # a full-size SAM ViT-B, built and run at 1024 px
def test_original_sam_checkpoints_load_through_segment_anything(tmp_path):
    segment_anything = pytest.importorskip("segment_anything")
    from ml_backend.models import build_segmenter

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(segment_anything.sam_model_registry["vit_b"]().state_dict(), path)
    segmenter = build_segmenter(str(path), tmp_path, torch.device("cpu"), cache_size=2)
    image = np.array(make_image(96, 64))
    masks, scores = segmenter.segment(image, boxes=np.array([[4, 4, 50, 40], [10, 10, 90, 60]]))
    assert masks.shape == (2, 64, 96) and masks.dtype == bool and scores.shape == (2,)
    mask, score = segmenter.segment(image, points=np.array([[20, 20]]), point_labels=np.array([1]))
    assert mask.shape == (1, 64, 96)
    assert segmenter.cache_info()["hits"] == 1 and segmenter.cache_info()["misses"] == 1


def test_up_refuses_a_missing_folder_and_a_run_without_labels(tmp_path):
    done = run_cli("up", str(tmp_path / "nope"), "--tiny-models", "--data-dir", str(tmp_path / "ls"))
    assert done.returncode == 2 and "is not a folder of images" in done.stderr
    (tmp_path / "images").mkdir()
    done = run_cli("up", str(tmp_path / "images"), "--tiny-models", "--data-dir", str(tmp_path / "ls"), "--port", str(free_port()))
    assert done.returncode == 2 and "needs labels: pass --prompts FILE" in done.stderr
