"""Shared test fixtures: the real data beside the repository, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels are defined when titans_memory is first imported: without a GPU they must be
# defined in interpreter mode, so the variable is set before any test module imports the library.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(os.environ.get("TITANS_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set TITANS_TEST_DATA")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
