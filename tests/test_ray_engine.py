"""`annotate_project` with the Ray engine: a local Ray (2 CPUs, 2 actors on tiny models) against a real Label Studio
serving the images as local files."""

from __future__ import annotations

from functools import partial

import pytest
from label_studio_sdk.client import LabelStudio

from ml_backend.engines.ray_engine import ray_engine
from ml_backend.labelstudio.annotate import TaskPredictor, annotate_project
from ml_backend.labelstudio.backend import LabelStudioBackend
from ml_backend.engine import Engine
from ml_backend.settings import Settings

from .conftest import LEGACY_TOKEN, encode, make_image

ray = pytest.importorskip("ray", reason="Ray is installed by the project's test extra (or `prelabel[ray]`)")

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
</View>"""
GOOD = 10


def test_ray_engine_predicts_each_task_once_and_reports_failures(local_ray, label_studio, image_dir, tiny_models, tmp_path):
    folder = image_dir / "ray-engine"
    folder.mkdir()
    refs = []
    for i in range(GOOD):
        (folder / f"img{i}.png").write_bytes(encode(make_image(80 + 8 * i, 60 + 4 * i, seed=i)))
        refs.append(f"/data/local-files/?d=ray-engine/img{i}.png")
    refs.append("/data/local-files/?d=ray-engine/missing.png")

    client = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    project = client.projects.create(title="ray engine", label_config=CONFIG)
    client.import_storage.local.create(project=project.id, path=str(folder))  # lets Label Studio serve the folder
    client.projects.import_tasks(id=project.id, request=[{"image": ref} for ref in refs])
    ids = {task.data["image"]: task.id for task in client.tasks.list(project=project.id)}
    missing = ids.pop(refs[-1])

    settings = Settings(detector=str(tiny_models["detector"]), segmenter="", label_studio_url=label_studio,
                        label_studio_api_key=LEGACY_TOKEN, model_dir=tmp_path / "model-dir")
    backend = LabelStudioBackend.for_batch(Engine.from_settings(settings))
    engine = ray_engine(partial(TaskPredictor, settings), actors=2, cpus_per_actor=1)

    report = annotate_project(client, project.id, backend, batch_size=3, engine=engine)
    assert (report.total, report.done, report.interrupted) == (GOOD + 1, GOOD, False)
    (failure,) = report.failed
    assert failure["task"] == missing and failure["error"]["kind"].startswith("image")
    assert f"task {missing}" in failure["error"]["message"] and "404" in failure["error"]["message"]
    assert report.seconds > 0
    for task_id in ids.values():
        (prediction,) = client.predictions.list(task=task_id)
        assert prediction.model_version == report.model_version and prediction.result is not None
    assert not list(client.predictions.list(task=missing))

    client.tasks.delete(id=missing)  # else the next run would retry it (and fail the same way)
    again = annotate_project(client, project.id, backend, batch_size=3, engine=engine)
    assert (again.total, again.done, again.failed, again.skipped["already predicted"]) == (0, 0, [], GOOD)
    assert all(len(list(client.predictions.list(task=t))) == 1 for t in ids.values())


def test_the_annotate_command_runs_on_ray(local_ray, label_studio, image_dir, tiny_models, tmp_path):
    from typer.testing import CliRunner

    from ml_backend.cli import app

    folder = image_dir / "ray-cli"
    folder.mkdir()
    for i in range(4):
        (folder / f"img{i}.png").write_bytes(encode(make_image(72, 56, seed=20 + i)))
    client = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
    project = client.projects.create(title="ray cli", label_config=CONFIG)
    client.import_storage.local.create(project=project.id, path=str(folder))
    client.projects.import_tasks(id=project.id, request=[{"image": f"/data/local-files/?d=ray-cli/img{i}.png"} for i in range(4)])
    result = CliRunner().invoke(app, ["annotate", "--project", str(project.id), "--url", label_studio, "--api-key", LEGACY_TOKEN,
                                      "--detector", str(tiny_models["detector"]), "--engine", "ray", "--ray-actors", "2",
                                      "--batch-size", "2", "--report", str(tmp_path / "report.json")],
                                env={"MODEL_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "4 of 4 tasks pre-annotated" in result.output
    assert sum(len(list(client.predictions.list(task=t.id))) for t in client.tasks.list(project=project.id)) == 4
