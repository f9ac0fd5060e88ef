"""CVAT tracker: SAM 2 video (or SAM 3's tracker) follows each box from frame to frame; the memory stays here, under
a key in the state CVAT carries. A thin shell over ml_backend."""

from pathlib import Path

from ml_backend.cvat.serverless import respond
from ml_backend.cvat.tracker import TrackerFunction


def init_context(context):
    context.user_data.function = TrackerFunction.from_env(Path(__file__).parent)  # the model loads once, here


def handler(context, event):
    return respond(context, context.user_data.function, event)
