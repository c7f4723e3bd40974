"""Fixtures for the flow tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) per test module that asks for it: starting it costs seconds, and a
    module's flow runs, artifacts and events stay apart from the next module's."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
