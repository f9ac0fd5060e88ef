"""CVAT detector: SAM 3 finds every instance of each label's prompts, boxed and masked in one pass. A thin shell over
ml_backend."""

from pathlib import Path

from ml_backend.cvat.serverless import DetectorFunction, respond


def init_context(context):
    context.user_data.function = DetectorFunction.from_env(Path(__file__).parent)  # SAM 3 loads once, here
    context.logger.info(f"labels: {[label['name'] for label in context.user_data.function.label_spec()]}")


def handler(context, event):
    return respond(context, context.user_data.function, event)
