"""CVAT adapter: conversion to CVAT shapes (nuclio functions and cvat-sdk auto-annotation build on it)."""
