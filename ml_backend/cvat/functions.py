"""`prelabel cvat spec`: write a prompts file's labels into the detector's function.yaml files (comments and the
user's own edits kept) and copy the prompts beside them, so that the labels CVAT shows are the labels detected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import LiteralScalarString

from ..errors import ConfigError
from ..ontology import PromptsFile
from .convert import SHAPE_TYPES
from .serverless import PROMPTS_FILE, SHAPE_ENV, label_spec

FUNCTION_FILES = ("function.yaml", "function-gpu.yaml")
FETCH = "prelabel fetch --prompts /opt/nuclio/" + PROMPTS_FILE
DETECTOR_ENV, SEGMENTER_ENV = "PRELABEL_DETECTOR", "PRELABEL_SEGMENTER"


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _set_env(env: list, name: str, value: str) -> None:
    for item in env:
        if item.get("name") == name:
            item["value"] = value
            return
    env.append({"name": name, "value": value})


def fetch_command(env: dict[str, str], shape: str) -> str:
    """The build's `prelabel fetch`: the models the function's environment names (PRELABEL_DETECTOR, e.g. SAM 3),
    else the prompts file's; no segmenter for boxes only or where PRELABEL_SEGMENTER is empty (SAM 3's own masks)."""
    command = FETCH
    if env.get(DETECTOR_ENV):
        command += f" --detector {env[DETECTOR_ENV]}"
    if shape == "rectangle" or env.get(SEGMENTER_ENV, None) == "":
        command += " --segmenter none"
    elif env.get(SEGMENTER_ENV):
        command += f" --segmenter {env[SEGMENTER_ENV]}"
    return command


def write_function_spec(function_dir: Path, prompts: Path, shape: str = "rectangle") -> list[Path]:
    """Update function.yaml and function-gpu.yaml in `function_dir`; returns the files written."""
    if shape not in SHAPE_TYPES:
        raise ConfigError(f"shape {shape!r} is not one of {SHAPE_TYPES}")
    prompts_file = PromptsFile.load(prompts)
    ontology = prompts_file.ontology()
    if not ontology.labels:
        raise ConfigError(f"prompts file {prompts} has no labels: CVAT would get a detector without labels")
    spec = label_spec(ontology, shape, prompts_file.tag_classification())
    text = "[\n" + ",\n".join(f"  {json.dumps(item)}" for item in spec) + "\n]\n"
    yaml, written = _yaml(), []
    for name in FUNCTION_FILES:
        path = function_dir / name
        if not path.exists():
            continue
        doc = yaml.load(path)
        annotations = doc["metadata"]["annotations"]
        if annotations.get("type") != "detector":
            raise ConfigError(f"{path} is not a detector function (metadata.annotations.type)")
        annotations["spec"] = LiteralScalarString(text)
        _set_env(doc["spec"].setdefault("env", []), SHAPE_ENV, shape)
        env = {item.get("name"): str(item.get("value") or "") for item in doc["spec"]["env"]}
        for directive in doc["spec"]["build"]["directives"].get("postCopy", []):
            if directive.get("kind") == "RUN" and str(directive.get("value", "")).startswith("prelabel fetch"):
                directive["value"] = fetch_command(env, shape)
        yaml.dump(doc, path)
        written.append(path)
    if not written:
        raise ConfigError(f"{function_dir} has none of {FUNCTION_FILES}")
    target = function_dir / PROMPTS_FILE
    if Path(prompts).resolve() != target.resolve():
        shutil.copyfile(prompts, target)
    return [*written, target]
