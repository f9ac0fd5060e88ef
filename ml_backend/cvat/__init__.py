"""CVAT adapter: conversion to CVAT shapes (`convert`; nuclio functions and cvat-sdk auto-annotation build on it) and
CVAT exports read as neutral records (`records`; CVAT's COCO export is read by `ml_backend.coco`)."""
