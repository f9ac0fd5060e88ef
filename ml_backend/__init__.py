"""prelabel: open-vocabulary pre-annotation for Label Studio and CVAT."""

__version__ = "0.1.0"
