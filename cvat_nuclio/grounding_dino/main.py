"""CVAT detector: open-vocabulary Grounding DINO (SAM masks for mask/polygon labels). A thin shell over ml_backend."""

from pathlib import Path

from ml_backend.cvat.serverless import DetectorFunction, respond


def init_context(context):
    context.user_data.function = DetectorFunction.from_env(Path(__file__).parent)  # models load once, here
    context.logger.info(f"labels: {[label['name'] for label in context.user_data.function.label_spec()]}")


def handler(context, event):
    return respond(context, context.user_data.function, event)
