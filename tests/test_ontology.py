"""Prompts files -> ontology: synonyms, thresholds, predicted_values, label names, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_backend.errors import ConfigError, PromptsError
from ml_backend.labelstudio.config import parse_config
from ml_backend.ontology import PromptsFile

from .conftest import CONFIG

ROOT = Path(__file__).resolve().parents[1]


def test_example_prompts_file_loads():
    prompts = PromptsFile.load(ROOT / "prompts" / "example.yaml")
    ontology = prompts.ontology()
    by_name = {s.name: s for s in ontology.labels}
    assert by_name["Bottle"].prompts == ("bottle", "plastic bottle")
    assert by_name["Can"].threshold == 0.3 and by_name["Bottle"].threshold == prompts.box_threshold
    assert prompts.detector == "IDEA-Research/grounding-dino-tiny"


def test_prompts_come_from_file_then_predicted_values_then_the_label_name(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("box_threshold: 0.4\nlabels:\n  car: [automobile]\n")
    config = parse_config(CONFIG)
    assert config.predicted_values == {"Car": ["car", "truck"]}
    ontology = config.ontology(PromptsFile.load(path), max_detections=7)
    by_name = {s.name: s for s in ontology.labels}
    assert by_name["Car"].prompts == ("automobile",), "file entries match label names case-insensitively"
    assert by_name["Person"].prompts == ("person",)
    assert ontology.max_detections == 7 and by_name["Person"].threshold == 0.4
    assert config.ontology(PromptsFile(), 100).labels[0].prompts == ("car", "truck")


def test_digest_changes_with_any_prompt_or_threshold():
    base = PromptsFile(labels={"Car": ["car"]}).ontology()
    assert base.digest() == PromptsFile(labels={"Car": ["car"]}).ontology().digest()
    assert base.digest() != PromptsFile(labels={"Car": ["car", "van"]}).ontology().digest()
    assert base.digest() != PromptsFile(labels={"Car": {"prompts": ["car"], "threshold": 0.5}}).ontology().digest()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("labels: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("box_threshold: 2\n", "box_threshold"),
        ("labels:\n  Car: {prompts: []}\n", "labels.Car.prompts"),
        ("labels:\n  Car: {promts: [car]}\n", "labels.Car.promts"),
        ("labels:\n  Car: [car]\n  Truck: [car]\n", "'car' is given for both labels 'Car' and 'Truck'"),
    ],
)
def test_bad_prompts_files_name_the_problem(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PromptsError, match=expected.replace("[", r"\[")) as err:
        PromptsFile.load(path).ontology()
    assert "bad.yaml" in str(err.value) or "given for both" in str(err.value)


def test_missing_prompts_file_is_named(tmp_path):
    with pytest.raises(PromptsError, match="nope.yaml does not exist"):
        PromptsFile.load(tmp_path / "nope.yaml")


def test_config_controls_are_all_found():
    config = parse_config(CONFIG)
    assert [(c.type, c.from_name) for c in config.controls] == [
        ("rectanglelabels", "label"), ("brushlabels", "brush"), ("polygonlabels", "poly"),
    ]
    assert config.labels == ["Car", "Person"] and config.needs_masks
    assert config.mask_control("image").from_name == "brush"


def test_config_image_value_must_come_from_task_data():
    with pytest.raises(ConfigError, match="value="):
        parse_config('<View><Image name="i" value="http://x/a.png"/><RectangleLabels name="r" toName="i"><Label value="A"/></RectangleLabels></View>')
