"""A module-scoped fixture that runs a test module on one intra-op thread.

    from _one_thread import one_thread  # noqa: F401  (autouse: importing it is enough)

On a shared two-core machine, OpenMP threads waiting for each other make tiny ops many times
slower; the previous thread count is restored after the module.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
