"""prelabel: open-vocabulary pre-annotation for Label Studio and CVAT.

The core (this package's modules) owns the neutral types, media items, the prediction engine (`engine.py`),
uncertainty, COCO, evaluation, the effort measure and the prompt workbench; `models/` the model families behind a
registry; `engines/` running batches elsewhere (Ray); the adapters `labelstudio/`, `cvat/`, `review/` and
`distill/` translate between their world and the core; `cli.py` composes them. See docs/ARCHITECTURE.md."""

__version__ = "0.1.0"
