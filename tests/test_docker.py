"""docker/ cannot be built here (no Docker engine): check that its ports, environment names and commands agree
with the settings object and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
import yaml

from ml_backend.cli import app
from ml_backend.settings import environment_variables

DOCKER = Path(__file__).resolve().parents[1] / "docker"
HUB_VARIABLES = {"HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"}


def serve_options() -> set[str]:
    command = typer.main.get_command(app).commands["serve"]
    return {opt for param in command.params for opt in param.opts}


def check_serve_command(argv: list[str]) -> int:
    assert argv[:2] == ["prelabel", "serve"]
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert set(flags) <= serve_options(), set(flags) - serve_options()
    return int(argv[argv.index("--port") + 1])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_serve_on_the_exposed_port_with_real_flags_and_settings(name):
    text = (DOCKER / name).read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    port = check_serve_command(cmd)
    assert f"EXPOSE {port}" in text
    for line in re.findall(r"^ENV (.*)$", text, re.M):
        names = {pair.split("=")[0] for pair in line.split()}
        assert names <= environment_variables() | HUB_VARIABLES, names
    assert "/app/prompts/example.yaml" in cmd and "COPY prompts prompts" in text
    assert ("--device" in cmd) == (name == "Dockerfile.gpu")


def test_compose_wires_label_studio_and_the_backend_together():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    studio, backend = compose["services"]["label-studio"], compose["services"]["prelabel"]
    port = check_serve_command(backend["command"])
    assert f"{port}:{port}" in backend["ports"]
    env = backend["environment"]
    assert set(env) <= environment_variables() | HUB_VARIABLES
    studio_port = studio["ports"][0].split(":")[1]
    assert env["LABEL_STUDIO_URL"] == f"http://label-studio:{studio_port}"
    assert studio["environment"]["LABEL_STUDIO_USER_TOKEN"].startswith("${LABEL_STUDIO_API_KEY")
    assert env["LABEL_STUDIO_API_KEY"] == "${LABEL_STUDIO_API_KEY}"
    assert studio["environment"]["LOCAL_FILES_DOCUMENT_ROOT"] == env["LOCAL_FILES_DOCUMENT_ROOT"]
    shared = {v.split(":")[0] for v in studio["volumes"]} & {v.split(":")[0] for v in backend["volumes"]}
    assert shared, "the backend must read the same media as Label Studio"
    assert studio["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert backend["build"]["dockerfile"] == "docker/Dockerfile"
