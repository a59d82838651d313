"""Fixtures shared by the whole suite.

- Every test runs on one intra-op thread (`one_thread`, automatic).
- ``device``: a test that takes it runs once on "cpu" and once on "cuda", the latter skipped
  with a reason where CUDA is not available.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the whole session, in this process and in the processes it starts.

    The suite's models are tiny: on a shared two-core machine, OpenMP threads waiting for each
    other at barriers make their ops slower than one thread does.  One fixed count also keeps
    runs that are compared bit for bit (a resumed run against an uninterrupted one, one process
    against two) on the same summation order.  Session scope: it is set up before any module
    fixture (a trained collection, a single-process run) runs.
    """
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # children (spawned ranks, `clipforge serve`) read it at start
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request: pytest.FixtureRequest) -> str:
    """The device a test runs on: "cpu", then "cuda" where available (skipped with the reason otherwise)."""
    return request.param
