"""Values as written: a 0, 0.0 or "" a user wrote is honoured, never replaced by a default (issue 16, point 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ml_backend.engine import Engine, RequestSpec, model_refs
from ml_backend.errors import PromptsError
from ml_backend.labelstudio.annotate import run_annotate
from ml_backend.media import MediaItem
from ml_backend.models.student import WEIGHTS_FILE, StudentDetector
from ml_backend.models.tiny import write_tiny_student
from ml_backend.ontology import PromptsFile
from ml_backend.settings import DEFAULT_SEGMENTER, Settings
from ml_backend.types import CLASS_NAME

from .conftest import encode, make_image

PROMPTS = """
box_threshold: 0.5
labels:
  car: {prompts: [car], threshold: 0.0}
  person: [person]
  crate: {prompts: [crate], detect: [box], threshold: 0.0}
"""


def prompts_file(tmp_path, text: str = PROMPTS) -> PromptsFile:
    path = tmp_path / "prompts.yaml"
    path.write_text(text)
    return PromptsFile.load(path)


def test_a_label_threshold_of_zero_is_kept_and_the_others_take_the_files_box_threshold(tmp_path):
    ontology = prompts_file(tmp_path).ontology()
    assert {s.name: s.threshold for s in ontology.labels} == {"car": 0.0, "person": 0.5, "crate": 0.0}


def faint_student(directory):
    """A tiny student whose every score is under 0.01 (its class logits pushed far down)."""
    write_tiny_student(directory)
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True)
    state["head.classification_head.cls_logits.bias"].fill_(-12.0)
    torch.save(state, directory / WEIGHTS_FILE)
    return StudentDetector(directory)


def test_a_label_threshold_of_zero_keeps_boxes_scoring_under_one_percent_through_the_engine(tmp_path):
    prompts = prompts_file(tmp_path, "box_threshold: 0.5\nlabels:\n  car: {prompts: [car], threshold: 0.0}\n  person: [person]\n")
    engine = Engine(faint_student(tmp_path / "student"), None, prompts, Settings(model_dir=tmp_path))
    image = np.array(make_image(96, 64))
    (result,) = engine.run([MediaItem(image, "faint")], RequestSpec(engine.ontology()))
    det = result.detections
    assert len(det) and set(det.data[CLASS_NAME]) == {"car"}  # person keeps the file's 0.5: none of it
    assert (det.confidence < 0.01).all() and (det.confidence > 0).all()


def test_a_file_box_threshold_of_zero_keeps_the_students_faintest_boxes(tmp_path):
    ontology = PromptsFile(labels={"car": ["car"]}, box_threshold=0.0).ontology()
    (det,) = faint_student(tmp_path / "student").detect([np.array(make_image(96, 64))], ontology)
    assert len(det) and (det.confidence < 0.01).all()


def test_a_prompts_files_empty_segmenter_means_none_not_the_default(tmp_path):
    assert model_refs(Settings(), prompts_file(tmp_path, 'segmenter: ""\n'))[1] is None
    assert model_refs(Settings(), PromptsFile())[1] == DEFAULT_SEGMENTER
    assert model_refs(Settings(segmenter="x"), prompts_file(tmp_path, 'segmenter: ""\n'))[1] == "x"  # the flag wins


def test_folder_mode_with_limit_zero_annotates_nothing(tiny_models, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(encode(make_image(64, 48, seed=i)))
    given = {"detector": str(tiny_models["detector"]), "segmenter": "", "model_dir": tmp_path / "models"}
    report, _ = run_annotate(folder, None, tmp_path / "none", given, limit=0)
    assert report.total == 0 and json.loads((tmp_path / "none" / "tasks.json").read_text()) == []
    report, _ = run_annotate(folder, None, tmp_path / "one", given, limit=1)
    assert report.total == 1 and len(json.loads((tmp_path / "one" / "tasks.json").read_text())) == 1


def test_a_project_run_with_limit_zero_takes_no_task(label_studio):
    from label_studio_sdk.client import LabelStudio

    from ml_backend.labelstudio.annotate import pending_tasks

    from .conftest import LEGACY_TOKEN

    ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    config = '<View><Image name="image" value="$image"/><RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels></View>'
    project = ls.projects.create(title="limit zero", label_config=config)
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": f"http://example.invalid/{i}.png"}} for i in range(3)])
    assert pending_tasks(ls, project.id, "some-version", only_unlabeled=False, limit=0)[0] == []
    assert len(pending_tasks(ls, project.id, "some-version", only_unlabeled=False, limit=2)[0]) == 2
    assert len(pending_tasks(ls, project.id, "some-version", only_unlabeled=False, limit=None)[0]) == 3


def test_a_prompts_files_empty_detector_is_an_error_not_the_default(tmp_path):
    with pytest.raises(PromptsError, match=r"prompts\.yaml.*detector.*names no model"):
        prompts_file(tmp_path, 'detector: ""\n')
