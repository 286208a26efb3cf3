"""Fixtures shared by the algorithm tests."""

import pytest
import torch


@pytest.fixture
def float64():
    """torch's default dtype is float64 for the test, so that learners build float64 networks."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
