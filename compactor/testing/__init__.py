"""Helpers for testing and benchmarking compactor: a zoo of small reference models."""

from . import zoo
from .zoo import NAMES, ZooEntry, build, example_inputs_at, get, randomize_, resnet50_like

__all__ = ["zoo", "NAMES", "ZooEntry", "build", "example_inputs_at", "get", "randomize_", "resnet50_like"]
