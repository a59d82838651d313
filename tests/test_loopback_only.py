"""The suite's guard (conftest `loopback_only`): nothing in a test reaches outside this machine."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest


def test_an_outside_host_is_refused_before_any_lookup():
    with pytest.raises(OSError, match="loopback interface only, not 'huggingface.co'"):
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=1)
    with pytest.raises(OSError, match="loopback"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_the_loopback_interface_is_free_and_the_hub_client_offline():
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname(), timeout=2):
        pass
    assert os.environ["HF_HUB_OFFLINE"] == "1"
