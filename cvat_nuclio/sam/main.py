"""CVAT interactor: SAM (or SAM 3's tracker) turns clicks and/or a box into a mask and polygon. A thin shell over
ml_backend."""

from pathlib import Path

from ml_backend.cvat.serverless import InteractorFunction, respond


def init_context(context):
    context.user_data.function = InteractorFunction.from_env(Path(__file__).parent)  # the model loads once, here


def handler(context, event):
    return respond(context, context.user_data.function, event)
