"""What `prelabel up` sets up besides the servers: the label config's tool rows, naming every missing model at once,
the address and key it leaves for the next commands, and what a refused API key tells people."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ml_backend.cli import _with_stack, app
from ml_backend.labelstudio.access import STACK_FILE, RunningStack, refused_message
from ml_backend.labelstudio.config import parse_config
from ml_backend.labelstudio.stack import label_config
from ml_backend.ontology import Ontology, LabelSpec

from .conftest import LEGACY_TOKEN, free_port


def ontology(*names: str) -> Ontology:
    return Ontology(tuple(LabelSpec(name, (name.lower(),), 0.3) for name in names))


def test_label_config_names_the_tool_of_each_row_of_labels():
    xml = label_config(ontology("Product", "Shelf Label"))
    headers = [line for line in xml.splitlines() if "<Header" in line]
    assert [h.split('"')[1].split(":")[0] for h in headers] == ["Boxes", "Masks", "Smart points"]
    config = parse_config(xml)
    assert [c.type for c in config.controls] == ["rectanglelabels", "brushlabels"] and config.needs_masks
    boxes_only = label_config(ontology("Product"), masks=False)
    assert boxes_only.count("<Header") == 1 and 'smart="true"' not in boxes_only  # a smart tool needs a segmenter


@pytest.mark.slow  # `prelabel up` in a process of its own: ~6 s
def test_up_names_every_missing_model_at_once_before_starting_anything(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("labels:\n  Product: [product]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "PRELABEL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "up", str(images), "--prompts", str(prompts), "--detector",
         str(tmp_path / "no-detector"), "--segmenter", "example-org/no-such-sam", "--classifier", "example-org/no-clip",
         "--port", "1", "--backend-port", "1"],
        env=env | {"HF_HUB_OFFLINE": "1", "MODEL_DIR": str(tmp_path / "models")}, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "3 models are missing" in message
    for kind, ref in [("detector", "no-detector"), ("segmenter", "no-such-sam"), ("classifier", "no-clip")]:
        assert f"{kind}: model" in message and ref in message
    assert str(tmp_path / "models") in message  # where MODEL_DIR entries go: MODEL_DIR is honoured
    assert not (tmp_path / "models" / "label-studio" / "label_studio.sqlite3").exists()


def test_a_running_stack_is_found_and_a_stale_one_is_not(tmp_path):
    stack = RunningStack("http://127.0.0.1:8123", "tok", os.getpid(), tmp_path / STACK_FILE)
    stack.write()
    assert (tmp_path / STACK_FILE).stat().st_mode & 0o777 == 0o600
    assert "LABEL_STUDIO_API_KEY=tok" in (tmp_path / STACK_FILE).read_text()  # `set -a; . FILE` works in a shell
    assert RunningStack.find(tmp_path) == stack
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    RunningStack("http://127.0.0.1:8123", "tok", dead.pid, tmp_path / STACK_FILE).write()
    assert RunningStack.find(tmp_path) is None
    assert RunningStack.find(tmp_path / "nowhere") is None


def test_flags_and_environment_come_before_a_running_stack(tmp_path, monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    RunningStack("http://127.0.0.1:8123", "up-token", os.getpid(), tmp_path / STACK_FILE).write()
    found = _with_stack({"label_studio_url": None, "label_studio_api_key": None})
    assert found == {"label_studio_url": "http://127.0.0.1:8123", "label_studio_api_key": "up-token"}
    given = {"label_studio_url": "http://studio.example:8080", "label_studio_api_key": None}
    assert _with_stack(given) == given  # another Label Studio: not its token
    assert _with_stack({"label_studio_url": None, "label_studio_api_key": "mine"})["label_studio_api_key"] == "mine"
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://other.example:8080")
    assert _with_stack({"label_studio_url": None, "label_studio_api_key": None})["label_studio_api_key"] is None


def test_a_refused_key_says_what_to_do():
    message = refused_message(401, {"detail": "Invalid token."}, "http://127.0.0.1:8080")
    assert "Invalid token." in message and "Access Token" in message and "LABEL_STUDIO_API_KEY" in message
    assert "{" not in message
    assert refused_message(404, {"detail": "Not found."}, None) is None


def test_a_wrong_api_key_against_a_real_label_studio(label_studio, monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    for command in (["rank", "--project", "1"], ["effort", "--project", "1"]):
        result = CliRunner().invoke(app, command + ["--url", label_studio, "--api-key", LEGACY_TOKEN[::-1]])
        assert result.exit_code == 2, result.output
        output = " ".join(result.output.split())
        assert "refused the API key" in output and "Access Token" in output and "{'detail'" not in output


@pytest.mark.slow  # ~3 s of the SDK retrying a closed port (the full suite runs it)
def test_an_unreachable_label_studio_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = CliRunner().invoke(app, ["effort", "--project", "1", "--url", url, "--api-key", "key"])
    assert result.exit_code == 2, result.output
    assert f"cannot reach {url}/api/" in result.output and "Traceback" not in result.output
