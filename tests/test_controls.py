"""Which controls of a Label Studio label config the backend fills: those its models can fill and the prompts file's
`controls:` lets in. The others are skipped with a note (/setup's answer, /health, the log), never an error; only a
config where nothing can be filled is refused."""

from __future__ import annotations

import logging

import httpx
import pytest
import torch

from ml_backend.engine import Engine
from ml_backend.errors import ConfigError, PromptsError
from ml_backend.labelstudio.config import parse_config
from ml_backend.labelstudio.server import create_app
from ml_backend.models.classifier import build_classifier
from ml_backend.models.tiny import write_tiny_classifier
from ml_backend.ontology import ControlsEntry, PromptsFile

from .conftest import LEGACY_TOKEN, RunningServer, make_settings
from .test_classification import ALL_BOXES, TWO_STAGE

QUALITY = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <Choices name="quality" toName="image"><Choice value="good"/><Choice value="bad"/></Choices>
  <TextArea name="prompt" toName="image"/>
</View>"""
BOXES_ONLY = QUALITY.split("<Choices")[0] + "</View>"
TASKS = [{"id": i + 1, "data": {"image": f"/data/upload/img{i}.png"}} for i in range(3)]


def skipped(selection) -> dict[str, str]:
    return {s.control: s.reason for s in selection.skipped}


# --- the selection -----------------------------------------------------------------------------------------------


def test_choices_are_filled_only_by_a_classifier_and_otherwise_skipped_naming_the_setting():
    config = parse_config(QUALITY)
    assert config.select(True, True, True, ControlsEntry()).config == config, "all filled: the config as it is"
    without = config.select(True, True, False, ControlsEntry())
    assert list(skipped(without)) == ["quality"] and "PRELABEL_CLASSIFIER" in skipped(without)["quality"]
    assert without.config.choices == [] and [c.from_name for c in without.config.controls] == ["box"]
    assert without.config.labels == ["Car", "Person"] and without.warnings == []


def test_mask_controls_need_a_segmenter_and_per_region_choices_need_their_regions():
    config = parse_config(TWO_STAGE.replace('<Choices name="scene"', '<BrushLabels name="paint" toName="image">'
                                                                     '<Label value="Road"/></BrushLabels><Choices name="scene"'))
    no_sam = config.select(True, False, True, ControlsEntry())
    assert list(skipped(no_sam)) == ["paint"] and "PRELABEL_SEGMENTER" in skipped(no_sam)["paint"]
    assert no_sam.config.labels == ["Car", "Person"] and not no_sam.config.needs_masks
    no_boxes = config.select(True, True, True, ControlsEntry(skip=["box"]))
    assert skipped(no_boxes) == {"box": "the prompts file's `controls: skip` names it",
                                 "colour": "it classifies the regions of ['box'], which are skipped"}
    assert [c.from_name for c in no_boxes.config.choices] == ["scene"] and no_boxes.config.labels == ["Road"]


def test_the_prompts_file_opts_controls_in_or_out_by_name(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("controls:\n  only: [box]\nlabels:\n  Car: [car]\n")
    only = parse_config(QUALITY).select(True, True, True, PromptsFile.load(path).controls)
    assert list(skipped(only)) == ["quality"] and "controls: only" in skipped(only)["quality"]
    path.write_text("controls:\n  skip: box\n")  # one name or a list
    skip = parse_config(QUALITY).select(True, True, True, PromptsFile.load(path).controls)
    assert list(skipped(skip)) == ["box"] and skip.config.labels == [] and skip.config.controls == []
    assert [c.from_name for c in skip.config.choices] == ["quality"]
    again = skip.config.select(True, True, True, PromptsFile.load(path).controls)
    assert again.config is skip.config and again.skipped == again.warnings == [], "selecting twice changes nothing"


def test_a_control_name_the_config_lacks_is_a_warning_naming_the_config_controls():
    selection = parse_config(QUALITY).select(True, True, True, ControlsEntry(skip=["qualty", "prompt"]))
    assert selection.skipped == [], "TextArea 'prompt' is a control of the config (interactive only)"
    (warning,) = selection.warnings
    assert "'qualty'" in warning and "['box', 'quality', 'prompt']" in warning


def test_a_config_with_nothing_to_fill_is_refused_naming_each_control_and_what_would_fill_it():
    with pytest.raises(ConfigError) as error:
        parse_config(QUALITY).select(True, True, False, ControlsEntry(only=["quality", "scene"]))
    message = str(error.value)
    assert "nothing in the label config can be pre-annotated" in message
    assert "'box': the prompts file's `controls: only` lists ['quality', 'scene']" in message
    assert "'quality': Choices need a zero-shot classifier (set PRELABEL_CLASSIFIER" in message
    assert "names 'scene', which is not a control" in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("controls:\n  only: [box]\n  skip: [quality]\n", "not both"),
        ("controls:\n  only: []\n", "at least 1 item"),
        ("controls:\n  skipp: [quality]\n", "controls.skipp"),
        ("controls: [box]\n", "controls: Input should be a valid dictionary"),
    ],
)
def test_a_bad_controls_entry_is_named_when_the_prompts_file_loads(tmp_path, text, problem):
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    with pytest.raises(PromptsError) as error:
        PromptsFile.load(path)
    assert problem in str(error.value) and str(path) in str(error.value)


# --- over HTTP -----------------------------------------------------------------------------------------------------


@pytest.fixture
def start_server(base_pipeline, ls_host, tmp_path):
    """Start a backend over real HTTP with a prompts file, with or without a (tiny CLIP) classifier."""
    servers = []

    def start(prompts: PromptsFile, classifier: bool = False) -> RunningServer:
        settings = make_settings(base_pipeline, tmp_path, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
        clip = None
        if classifier:
            clip = build_classifier(str(write_tiny_classifier(tmp_path / "clip", family="clip")), tmp_path, torch.device("cpu"))
        servers.append(RunningServer(create_app(Engine(base_pipeline.detector, base_pipeline.segmenter, prompts, settings, clip))))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def setup(http, server, config, project=7):
    return http.post(f"{server.url}/setup", json={"project": f"{project}.1700000000", "schema": config})


def test_without_classifier_setup_answers_with_what_it_skips_and_predict_gives_the_boxes(http, start_server, caplog):
    server = start_server(PromptsFile(**ALL_BOXES), classifier=False)
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        answer = setup(http, server, QUALITY)
        assert answer.status_code == 200, answer.text
        (note,) = answer.json()["skipped"]
        assert note["control"] == "quality" and "PRELABEL_CLASSIFIER" in note["reason"]
        assert answer.json()["model_version"] == setup(http, server, BOXES_ONLY, project=8).json()["model_version"], \
            "the version is that of what is filled"
        setup(http, server, QUALITY)
        response = http.post(f"{server.url}/predict", json={"tasks": TASKS, "project": "7.1700000000"})
    assert response.status_code == 200, response.text
    for entry in response.json()["results"]:
        assert entry["result"] and {r["type"] for r in entry["result"]} == {"rectanglelabels"}
        assert entry["model_version"] == answer.json()["model_version"]
    told = [r.getMessage() for r in caplog.records if "'quality' is not pre-annotated" in r.getMessage()]
    assert told == [f"project 7: control 'quality' is not pre-annotated: {note['reason']}"], "once per project"
    assert http.get(f"{server.url}/health").json()["skipped"] == {"7": [note]}

    with_classifier = start_server(PromptsFile(**ALL_BOXES), classifier=True)
    answer = setup(http, with_classifier, QUALITY).json()
    assert answer["skipped"] == [] and "+clip-" in answer["model_version"], "a classifier makes a new version"
    (entry, *_) = http.post(f"{with_classifier.url}/predict", json={"tasks": TASKS, "project": "7.1"}).json()["results"]
    assert {r["type"] for r in entry["result"]} == {"rectanglelabels", "choices"}


def test_the_prompts_file_controls_skip_over_http_with_a_warning_for_an_unknown_name(http, start_server, caplog):
    server = start_server(PromptsFile(**ALL_BOXES, controls={"skip": ["quality", "qualty"]}), classifier=True)
    with caplog.at_level(logging.WARNING, logger="ml_backend"):
        answer = setup(http, server, QUALITY).json()
        assert answer["skipped"] == [{"control": "quality", "reason": "the prompts file's `controls: skip` names it"}]
        assert len(answer["warnings"]) == 1 and "'qualty'" in answer["warnings"][0]
        assert "+clip-" not in answer["model_version"]
        response = http.post(f"{server.url}/predict", json={"tasks": TASKS, "project": "7.1700000000"})
    (entry, *_) = response.json()["results"]
    assert entry["result"] and {r["type"] for r in entry["result"]} == {"rectanglelabels"}
    warned = [r.getMessage() for r in caplog.records if "is not a control" in r.getMessage()]
    assert warned == [f"project 7: {answer['warnings'][0]}"], "once, and a skipped control is still one of the config's"


def test_setup_is_refused_only_when_nothing_is_left_to_fill(http, start_server):
    server = start_server(PromptsFile(controls={"skip": ["box"]}), classifier=False)
    response = setup(http, server, QUALITY)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "'box': the prompts file's `controls: skip` names it" in message and "'quality': Choices need" in message
    assert http.post(f"{server.url}/predict", json={"tasks": TASKS, "label_config": QUALITY}).status_code == 422


# --- through a real Label Studio -----------------------------------------------------------------------------------


def test_label_studio_connects_a_server_without_classifier_to_a_project_with_choices(label_studio, start_backend,
                                                                                       image_dir):
    from label_studio_sdk.client import LabelStudio

    server = start_backend(PromptsFile(**ALL_BOXES))  # no classifier
    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    project = ls.projects.create(title="boxes and quality", label_config=QUALITY)
    headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
    files = [(f"file{i}", (f"img{i}.png", (image_dir / f"img{i}.png").read_bytes())) for i in range(2)]
    httpx.post(f"{label_studio}/api/projects/{project.id}/import", files=files, headers=headers, timeout=60).raise_for_status()
    ml = ls.ml.create(url=server.url, project=project.id, is_interactive=False, title="prelabel")
    assert ls.ml.get(id=ml.id).state == "CO", "connected"
    response = httpx.post(f"{label_studio}/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project.id},
                          json={"selectedItems": {"all": True, "excluded": []}}, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    tasks = sorted(t.id for t in ls.tasks.list(project=project.id))
    assert len(tasks) == 2
    for task_id in tasks:
        (prediction,) = ls.predictions.list(task=task_id)
        assert prediction.result and {r["type"] for r in prediction.result} == {"rectanglelabels"}
        assert {r["from_name"] for r in prediction.result} == {"box"}
