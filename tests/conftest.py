"""Fixtures shared by the whole suite.

- Every test runs on one intra-op thread (`one_thread`, automatic).
- ``device``: a test that takes it runs once on "cpu" and once on "cuda", the latter skipped
  with a reason where CUDA is not available.  The CUDA cases' ids contain "cuda", so
  ``pytest -k cuda`` runs them all.
- ``no_tf32``: fp32 matmuls and convolutions in full fp32 on CUDA for the test that asks.
- cuBLAS is made repeatable (``CUBLAS_WORKSPACE_CONFIG``, set before CUDA starts) for the tests
  that switch on ``torch.use_deterministic_algorithms``.
- No test reaches outside this machine (`loopback_only`, automatic): a name lookup or a
  connection to anything but the loopback interface is an OSError naming the host, and the
  Hugging Face hub client is offline (``HF_HUB_OFFLINE=1``) unless a test says otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
import torch

# cuBLAS picks its reduction order per call, unless it is given a fixed workspace; PyTorch's
# deterministic mode then refuses to run without it.  It is read once, when CUDA starts, so it is
# set here, before any test touches CUDA (a value already in the environment is kept).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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


def _is_loopback(host: object) -> bool:
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host)).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def loopback_only() -> Iterator[None]:
    """Name lookups and connections reach the loopback interface only (the tests' own servers).

    A test that would download from a model hub or any other host fails at once with an OSError
    naming the host, rather than depending on, or waiting for, a network.  Unix sockets are free.
    """
    mp = pytest.MonkeyPatch()
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(host: object) -> OSError:
        return OSError(f"the tests reach the loopback interface only, not {host!r}")

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    def checked(real):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                raise refuse(address[0])
            return real(self, address)

        return connect

    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    mp.setattr(socket.socket, "connect", checked(real_connect))
    mp.setattr(socket.socket, "connect_ex", checked(real_connect_ex))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield
    mp.undo()


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request: pytest.FixtureRequest) -> str:
    """The device a test runs on: "cpu", then "cuda" where available (skipped with the reason otherwise)."""
    return request.param


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 on CUDA: TF32 would round their inputs to 10 bits,
    and no fp32 tolerance against a float64 reference would hold.  (No effect on the CPU.)"""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
