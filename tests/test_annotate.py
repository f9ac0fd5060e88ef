"""`prelabel annotate` and `prelabel rank` against a real Label Studio, and folder mode, on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from ml_backend.cli import app
from ml_backend.labelstudio.annotate import ERROR_KEY, FAILED_TAB, annotate_project, image_files
from ml_backend.labelstudio.rank import rank_project
from ml_backend.labelstudio.records import plain
from ml_backend.labelstudio.backend import LabelStudioBackend
from ml_backend.engine import Engine
from ml_backend.settings import Settings

from .conftest import LEGACY_TOKEN, encode, make_image

pytest.importorskip("label_studio", reason="Label Studio is installed by the project's test extra")
from label_studio_sdk.client import LabelStudio  # noqa: E402
from label_studio_sdk.label_interface import LabelInterface  # noqa: E402

BOXES = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""
TASKS = 50


@pytest.fixture(scope="module")
def many_images(image_dir) -> Path:
    folder = image_dir / "annotate"
    folder.mkdir(exist_ok=True)
    for i in range(TASKS):
        (folder / f"{i:03d}.png").write_bytes(encode(make_image(64 + i % 5 * 8, 48, seed=i)))
    return folder


@pytest.fixture
def ls(label_studio):
    return LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)


def make_project(ls, title: str, folder: Path, limit: int | None = None, extra: list[str] = ()) -> int:
    """Tasks for the images of `folder` (Label Studio serves local files only of a connected storage)."""
    project = ls.projects.create(title=title, label_config=BOXES)
    ls.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
    root = folder.parent
    refs = [f"/data/local-files/?d={p.relative_to(root).as_posix()}" for p in image_files(folder)][:limit]
    ls.projects.import_tasks(id=project.id, request=[{"data": {"image": ref}} for ref in [*refs, *extra]])
    return project.id


def task_ids(ls, project_id: int) -> list[int]:
    return sorted(t.id for t in ls.tasks.list(project=project_id))


def predictions_by_task(ls, project_id: int) -> dict[int, list]:
    out = {t.id: [] for t in ls.tasks.list(project=project_id)}
    for p in ls.predictions.list(project=project_id):
        out[p.task].append(p)
    return out


@pytest.fixture
def backend(label_studio, tiny_models, tmp_path) -> LabelStudioBackend:
    """Fetches images through Label Studio's HTTP API, as against a remote instance."""
    settings = Settings(detector=str(tiny_models["detector"]), segmenter="", label_studio_url=label_studio,
                        label_studio_api_key=LEGACY_TOKEN, model_dir=tmp_path / "models", batch_size=4)
    return LabelStudioBackend.for_batch(Engine.from_settings(settings))


def cli_args(label_studio, tiny_models, *extra) -> list[str]:
    return ["annotate", "--url", label_studio, "--api-key", LEGACY_TOKEN, "--detector", str(tiny_models["detector"]),
            "--segmenter", "none", *extra]


def test_a_project_is_annotated_fully_and_a_rerun_adds_nothing(ls, label_studio, tiny_models, many_images, image_dir, tmp_path):
    project_id = make_project(ls, "annotate all", many_images)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", *cli_args(label_studio, tiny_models, "--project", str(project_id),
                                                          "--batch-size", "8", "--report", str(report))],
        capture_output=True, text=True, timeout=300, env={"MODEL_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(report.read_text())
    assert summary["done"] == TASKS and summary["failed"] == [] and summary["ok"]
    version = summary["model_version"]
    by_task = predictions_by_task(ls, project_id)
    assert len(by_task) == TASKS and all(len(p) == 1 and p[0].model_version == version for p in by_task.values())
    interface = LabelInterface(BOXES)
    for (prediction,) in list(by_task.values())[:5]:
        assert interface.validate_prediction({"result": prediction.result}, return_errors=True) in (True, [])
        assert 0 <= prediction.score <= 1
    assert ls.projects.get(id=project_id).model_version == version, "the Data Manager shows these predictions"
    again = CliRunner().invoke(app, cli_args(label_studio, tiny_models, "--project", str(project_id), "--report", str(report)),
                               env={"MODEL_DIR": str(tmp_path)})
    assert again.exit_code == 0 and "0 of 0 tasks" in again.output and f"{TASKS} skipped (already predicted)" in again.output
    assert sum(len(p) for p in predictions_by_task(ls, project_id).values()) == TASKS


def test_an_interrupted_run_is_finished_by_the_next_with_one_prediction_per_task(ls, backend, many_images, image_dir):
    project_id = make_project(ls, "annotate interrupted", many_images)
    pushes = []

    class CtrlCOnFourthPush:
        """Label Studio's client, with Ctrl-C arriving while the fourth batch is being pushed."""

        def __getattr__(self, name):
            return getattr(ls, name)

        @property
        def projects(self):
            real = ls.projects

            class Projects:
                def __getattr__(self, name):
                    return getattr(real, name)

                def import_predictions(self, **kwargs):
                    pushes.append(len(kwargs["request"]))
                    if len(pushes) == 4:
                        raise KeyboardInterrupt
                    return real.import_predictions(**kwargs)

            return Projects()

    first = annotate_project(CtrlCOnFourthPush(), project_id, backend, batch_size=4)
    assert first.interrupted and first.done == 12 and not first.ok
    assert sum(bool(p) for p in predictions_by_task(ls, project_id).values()) == 12
    second = annotate_project(ls, project_id, backend, batch_size=4)
    assert second.ok and second.done == TASKS - 12 and second.skipped["already predicted"] == 12
    by_task = predictions_by_task(ls, project_id)
    assert all(len(p) == 1 and p[0].model_version == second.model_version for p in by_task.values())


def test_broken_images_are_reported_by_task_and_the_others_annotated(ls, label_studio, tiny_models, many_images, image_dir, tmp_path):
    broken = image_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "corrupt.png").write_bytes(encode(make_image(40, 40))[:50])
    project_id = make_project(ls, "annotate broken", many_images, limit=5, extra=["/data/local-files/?d=annotate/missing.png"])
    ls.import_storage.local.create(project=project_id, path=str(broken), use_blob_urls=True)
    ls.projects.import_tasks(id=project_id, request=[{"data": {"image": "/data/local-files/?d=broken/corrupt.png"}}])
    ids = task_ids(ls, project_id)
    missing, corrupt = ids[-2:]
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, cli_args(label_studio, tiny_models, "--project", str(project_id), "--report", str(report)),
                                env={"MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    assert f"task {missing}:" in result.output and "404" in result.output
    assert f"task {corrupt}:" in result.output and "corrupt or truncated" in result.output
    assert f"failed tasks: {label_studio}/projects/{project_id}/data?tab=" in result.output
    summary = json.loads(report.read_text())
    assert summary["done"] == 5 and {e["task"] for e in summary["failed"]} == {missing, corrupt} and not summary["ok"]
    by_task = predictions_by_task(ls, project_id)
    assert [len(by_task[t]) for t in ids] == [1] * 5 + [0, 0]


def test_only_unlabeled_and_limit(ls, backend, many_images, image_dir):
    project_id = make_project(ls, "annotate unlabeled", many_images, limit=6)
    first_task = min(t.id for t in ls.tasks.list(project=project_id))
    ls.annotations.create(id=first_task, result=[], was_cancelled=False)
    limited = annotate_project(ls, project_id, backend, only_unlabeled=True, limit=2)
    assert limited.done == 2 and limited.skipped["labeled"] == 1
    rest = annotate_project(ls, project_id, backend, only_unlabeled=True)
    assert rest.done == 3 and rest.skipped == {"already predicted": 2, "labeled": 1}
    assert predictions_by_task(ls, project_id)[first_task] == []


def test_folder_mode_writes_label_studio_tasks_and_coco_that_import(ls, tiny_models, many_images, image_dir, tmp_path):
    folder = image_dir / "folder-mode"
    folder.mkdir(exist_ok=True)
    for p in image_files(many_images)[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    args = ["annotate", str(folder), "--out", str(out), "--detector", str(tiny_models["detector"]),
            "--segmenter", str(tiny_models["segmenter"]), "--prompts", str(Path(__file__).parents[1] / "prompts/example.yaml")]
    env = {"MODEL_DIR": str(tmp_path), "LOCAL_FILES_DOCUMENT_ROOT": str(image_dir)}
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 1 and "broken.jpg" in first.output  # reported, the rest written
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 6 and tasks[0]["data"]["image"] == "/data/local-files/?d=folder-mode/000.png"
    config = (out / "label_config.xml").read_text()
    interface = LabelInterface(config)
    assert all(interface.validate_prediction(t["predictions"][0], return_errors=True) in (True, []) for t in tasks)
    project = ls.projects.create(title="folder import", label_config=config)
    ls.projects.import_tasks(id=project.id, request=tasks)
    by_task = predictions_by_task(ls, project.id)
    assert len(by_task) == 6 and all(len(p) == 1 for p in by_task.values())
    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == 6 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["Bottle", "Can", "Person", "Car"]
    boxes = sum(r["type"] == "rectanglelabels" for t in tasks for r in t["predictions"][0]["result"])
    assert len(coco.getAnnIds()) == boxes > 0
    ann = coco.loadAnns(coco.getAnnIds())[0]
    image = coco.loadImgs(ann["image_id"])[0]
    assert coco.annToMask(ann).shape == (image["height"], image["width"])
    again = CliRunner().invoke(app, args, env=env)  # resumes: only the broken image is tried again
    assert "6 skipped (already predicted)" in again.output and "0 of 1 tasks" in again.output
    assert json.loads((out / "tasks.json").read_text()) == tasks


def test_rank_orders_hardest_first_and_the_data_manager_sorts_the_same_way(ls, label_studio, backend, many_images, image_dir):
    project_id = make_project(ls, "annotate rank", many_images, limit=12)
    report = annotate_project(ls, project_id, backend, batch_size=6)
    result = CliRunner().invoke(app, ["rank", "--project", str(project_id), "--url", label_studio, "--api-key", LEGACY_TOKEN,
                                      "--top", "3"])
    assert result.exit_code == 0 and f"{label_studio}/projects/{project_id}/data?task=" in result.output
    version, ranked = rank_project(ls, project_id, label_studio)
    assert version == report.model_version and len(ranked) == 12
    assert [r.uncertainty for r in ranked] == sorted((r.uncertainty for r in ranked), reverse=True)
    order = json.dumps({"ordering": ["tasks:predictions_score"]})
    sorted_by_dm = [t.id for t in ls.tasks.list(project=project_id, fields="all", include="id,predictions_score", query=order)]
    scores = {t.id: t.predictions_score for t in ls.tasks.list(project=project_id, fields="all", include="id,predictions_score")}
    assert [round(scores[t], 6) for t in sorted_by_dm] == [round(1 - r.uncertainty, 6) for r in ranked]


def test_rank_scores_predictions_made_without_one(ls, label_studio, many_images, image_dir):
    project_id = make_project(ls, "annotate rank foreign", many_images, limit=3)
    ids = task_ids(ls, project_id)

    def box(score):
        return {"from_name": "box", "to_name": "image", "type": "rectanglelabels", "score": score,
                "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["Car"]}}

    ls.projects.import_predictions(id=project_id, request=[
        {"task": ids[0], "result": [box(0.95)], "model_version": "other-tool"},
        {"task": ids[1], "result": [box(0.36), box(0.9)], "model_version": "other-tool"},
        {"task": ids[2], "result": [], "model_version": "other-tool"},
    ])
    version, ranked = rank_project(ls, project_id, label_studio, thresholds={"Car": 0.35})
    assert version == "other-tool" and [r.task for r in ranked] == [ids[1], ids[0], ids[2]]
    stored = {p.task: p.score for p in ls.predictions.list(project=project_id)}
    assert stored[ids[2]] == 1.0 and stored[ids[1]] < stored[ids[0]] < 1.0
    with pytest.raises(Exception, match="no predictions of model version 'nope'"):
        rank_project(ls, project_id, label_studio, model_version="nope")


@pytest.mark.parametrize(
    "args, problem",
    [
        (["annotate"], "give either --project ID"),
        (["annotate", "imgs", "--project", "3"], "give either --project ID"),
        (["annotate", "imgs"], "folder mode needs --out DIR"),
        (["annotate", "--project", "3"], "give Label Studio's address and an API key"),
        (["annotate", "--project", "3", "--url", "http://127.0.0.1:9", "--api-key", "x", "--engine", "spark"], "--engine 'spark'"),
        (["rank", "--project", "3"], "give Label Studio's address and an API key"),
    ],
)
def test_annotate_and_rank_name_usage_errors(args, problem, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and problem in result.output, result.output


def test_annotate_names_a_missing_project(label_studio, tiny_models, tmp_path):
    result = CliRunner().invoke(app, cli_args(label_studio, tiny_models, "--project", "987654"), env={"MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "Label Studio has no project 987654" in result.output


@pytest.mark.slow  # ~9 s: runs the CLI in a subprocess (the full suite runs it)
def test_folder_mode_fails_only_the_corrupt_image_of_any_shape_and_names_its_file_once(tiny_models, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shapes = {"square.png": (300, 300), "tall-thin.png": (1000, 20), "one-pixel-high.png": (1, 200), "normal.png": (90, 160)}
    for name, (h, w) in shapes.items():
        pixels = np.random.default_rng(len(name)).integers(0, 255, (h, w, 3), dtype=np.uint8)
        (folder / name).write_bytes(encode(Image.fromarray(pixels)))
    (folder / "sub" / "corrupt.png").write_bytes(encode(make_image(80, 60))[:70])
    out, report = tmp_path / "out", tmp_path / "out" / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", "annotate", str(folder), "--out", str(out),
         "--detector", str(tiny_models["detector"]), "--segmenter", str(tiny_models["segmenter"]),
         "--prompts", str(Path(__file__).parents[1] / "prompts/example.yaml")],
        capture_output=True, text=True, timeout=300,
        env={"MODEL_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    (failed,) = json.loads(report.read_text())["failed"]
    message = failed["error"]["message"]
    assert failed["task"] == "sub/corrupt.png" and message.startswith("image sub/corrupt.png is corrupt or truncated")
    assert output.count(message) == 1 and output.count("corrupt.png") == 1, output
    assert "/data/local-files" not in output and "Traceback" not in output
    assert "4 of 5 tasks pre-annotated" in output and len(json.loads((out / "tasks.json").read_text())) == 4


def test_failed_tasks_carry_their_cause_in_a_data_manager_tab_until_a_rerun_succeeds(ls, label_studio, backend, image_dir):
    folder = image_dir / "failing"
    folder.mkdir(exist_ok=True)
    (folder / "good.png").write_bytes(encode(make_image(80, 60, seed=1)))
    (folder / "corrupt.png").write_bytes(encode(make_image(80, 60, seed=2))[:70])
    project_id = ls.projects.create(title="annotate failed tab", label_config=BOXES).id
    ls.import_storage.local.create(project=project_id, path=str(folder), use_blob_urls=True)
    ls.projects.import_tasks(id=project_id, request=[
        {"data": {"image": f"/data/local-files/?d=failing/{name}", "shelf": f"shelf {name}"}}
        for name in ("good.png", "later.png", "corrupt.png")])
    good, missing, corrupt = task_ids(ls, project_id)

    def errors() -> dict[int, str]:
        data = {t: ls.tasks.get(id=t).data for t in (good, missing, corrupt)}
        assert all(d["shelf"].startswith("shelf ") for d in data.values()), "the task's own data is kept"
        return {t: d[ERROR_KEY] for t, d in data.items() if ERROR_KEY in d}

    def tab_tasks(link: str) -> list[int]:
        tab = int(link.rsplit("?tab=", 1)[1])
        assert link == f"{label_studio}/projects/{project_id}/data?tab={tab}"
        return sorted(t.id for t in ls.tasks.list(project=project_id, view=tab))

    first = annotate_project(ls, project_id, backend)
    assert first.done == 1 and sorted(e["task"] for e in first.failed) == [missing, corrupt]
    causes = errors()
    assert set(causes) == {missing, corrupt}
    assert "later.png" in causes[missing] and "404" in causes[missing] and not causes[missing].startswith("task ")
    assert "corrupt or truncated" in causes[corrupt]
    link = first.outputs["failed tasks"]
    assert tab_tasks(link) == [missing, corrupt]
    columns = httpx.get(f"{label_studio}/api/dm/columns", params={"project": project_id},
                        headers={"Authorization": f"Token {LEGACY_TOKEN}"}).json()["columns"]
    assert ERROR_KEY in {c["id"] for c in columns}, "the cause is a Data Manager column"

    (folder / "later.png").write_bytes(encode(make_image(80, 60, seed=3)))
    second = annotate_project(ls, project_id, backend)
    assert second.done == 1 and [e["task"] for e in second.failed] == [corrupt]
    assert set(errors()) == {corrupt} and second.outputs["failed tasks"] == link, "the same tab, refreshed"
    assert tab_tasks(link) == [corrupt]

    (folder / "corrupt.png").write_bytes(encode(make_image(80, 60, seed=2)))
    third = annotate_project(ls, project_id, backend)
    assert third.ok and third.done == 1 and errors() == {} and "failed tasks" not in third.outputs
    assert FAILED_TAB not in {(plain(v).get("data") or {}).get("title") for v in ls.views.list(project=project_id)}

    stale = ls.tasks.get(id=good).data | {ERROR_KEY: "an earlier run's error (e.g. of another model version)"}
    ls.tasks.update(id=good, data=stale)
    fourth = annotate_project(ls, project_id, backend)
    assert fourth.skipped["already predicted"] == 3 and errors() == {}, "a task done with this version has no error"


def test_folder_mode_names_the_file_a_model_fails_on_and_logs_nothing_during_the_run(tiny_models, tmp_path, caplog):
    """SAM keeps the aspect ratio: a 1 x 1200 sliver leaves its short side 0 pixels at the tiny SAM's 256 px (as a
    1 x 5000 one does at a real SAM's 1024), a real model failure on this image only."""
    from ml_backend.labelstudio.annotate import run_annotate

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "normal.png").write_bytes(encode(make_image(160, 90)))
    sliver = np.random.default_rng(0).integers(0, 255, (1, 1200, 3), dtype=np.uint8)
    (folder / "sub" / "sliver.png").write_bytes(encode(Image.fromarray(sliver)))
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("box_threshold: 0\ntext_threshold: 0\nlabels:\n  Car: car\n")
    overrides = dict(detector=str(tiny_models["detector"]), segmenter=str(tiny_models["segmenter"]), prompts=prompts,
                     model_dir=tmp_path / "models")
    with caplog.at_level("INFO"):
        report, _ = run_annotate(folder, None, tmp_path / "out", overrides)
    assert report.done == 1
    (failed,) = report.failed
    assert failed["task"] == "sub/sliver.png" and failed["error"]["kind"] == "inference"
    assert failed["error"]["message"].startswith("the model failed on this image (sub/sliver.png): ")
    assert [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == [], "listed once, after the run"
