"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def float64_by_default():
    """float64 as the default dtype for a module's float64 reference comparisons (a module
    opts in with ``pytestmark = pytest.mark.usefixtures("float64_by_default")``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """One torch thread: on the shared 2-core machines two OpenMP threads fighting other
    processes made small detection steps 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
