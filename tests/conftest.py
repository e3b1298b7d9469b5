"""Shared pytest fixtures: a scripted HTTP server on 127.0.0.1 for the crawl tests (see tests/http_server.py)."""

from __future__ import annotations

import pytest

from tests.http_server import ScriptedServer


@pytest.fixture
def http_server():
    """A fresh threaded HTTP server on a free 127.0.0.1 port; route paths with `http_server.route(path, behaviour)`."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.close()
