"""The `prelabel` command: serve with tiny models, fail fast on missing weights, original SAM checkpoints; a quick
start (no torch where no model runs), its help, and quiet model loading."""

from __future__ import annotations

import json
import logging
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


@pytest.mark.slow  # a served process loading models: ~7 s (Label Studio tests serve it too)
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


@pytest.mark.slow  # ~9 s: starts `prelabel serve` in a subprocess (the full suite runs it)
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


@pytest.mark.slow  # `prelabel up` in processes of its own: ~7 s
def test_up_refuses_a_missing_folder_and_a_run_without_labels(tmp_path):
    done = run_cli("up", str(tmp_path / "nope"), "--tiny-models", "--data-dir", str(tmp_path / "ls"))
    assert done.returncode == 2 and "is not a folder of images" in done.stderr
    (tmp_path / "images").mkdir()
    done = run_cli("up", str(tmp_path / "images"), "--tiny-models", "--data-dir", str(tmp_path / "ls"), "--port", str(free_port()))
    assert done.returncode == 2 and "needs labels: pass --prompts FILE" in done.stderr


# In a fresh interpreter: every command's usage error, --version, and the modules that `rank` and `effort` run on.
QUICK_START = """
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from ml_backend.cli import app

commands = [[name] for name in get_command(app).commands]
results = {" ".join(args): CliRunner().invoke(app, args).exit_code for args in [["--version"], ["rank"], ["effort"]]}
results |= {name[0]: CliRunner().invoke(app, [*name, "--no-such-flag"]).exit_code for name in commands}
import ml_backend.cli_sources, ml_backend.effort, ml_backend.labelstudio.images, ml_backend.labelstudio.rank
import ml_backend.labelstudio.records, ml_backend.ontology
print(json.dumps({"exit": results, "heavy": [m for m in ("torch", "transformers", "fiftyone") if m in sys.modules]}))
"""


def test_usage_errors_version_rank_and_effort_start_without_torch_transformers_or_fiftyone():
    done = subprocess.run([sys.executable, "-c", QUICK_START], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert outcome["heavy"] == [], f"imported although no model runs: {outcome['heavy']}"
    assert outcome["exit"].pop("--version") == 0
    assert set(outcome["exit"].values()) == {2}, outcome["exit"]  # usage errors, every command
    from importlib.metadata import version

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout == f"prelabel {version('prelabel')}\n"


def _commands(command, path=()):
    yield list(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_shows_flags_as_flags_and_every_option_has_help():
    from typer.main import get_command
    from typer.testing import CliRunner

    from ml_backend.cli import app

    for path, command in _commands(get_command(app)):
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, f"prelabel {' '.join(path)} --help:\n{result.output}"
        assert "--help" in result.output and all(p.opts[0] in result.output for p in command.params if not p.hidden)
        undocumented = [p.opts[0] for p in command.params if not p.help]
        assert not undocumented, f"prelabel {' '.join(path)}: no help text for {undocumented}"


def test_models_load_and_tiny_models_write_without_progress_bars_unless_debug_logging(tmp_path, capfd, caplog):
    from transformers.utils import logging as hf_logging

    from ml_backend.models import build_detector
    from ml_backend.models.tiny import write_tiny_models

    detector = str(write_tiny_models(tmp_path / "tiny")["detector"])
    build_detector(detector, tmp_path, torch.device("cpu"))
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored: downloads keep their bars
    with caplog.at_level(logging.DEBUG, logger="ml_backend"):  # --verbose
        build_detector(detector, tmp_path, torch.device("cpu"))
    assert "Loading weights" in capfd.readouterr().err
