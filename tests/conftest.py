"""Test setup: Triton kernels run through the interpreter on CPU-only machines; GPU tests are
marked `gpu` and run only where CUDA is present (scripts/gpu_check.sh)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; runs in scripts/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
