"""Keep the tests' scratch files out of the checkout."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
from twisted.trial.unittest import SynchronousTestCase


@pytest.fixture(autouse=True, scope="session")
def _trial_mktemp_in_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """trial's ``mktemp()`` names a path under the current directory (the checkout, under
    pytest); give each call a fresh directory under pytest's temporary root instead."""
    base = tmp_path_factory.mktemp("trial")
    original = SynchronousTestCase.mktemp

    def mktemp(self: SynchronousTestCase) -> str:
        return os.path.join(tempfile.mkdtemp(dir=base), "temp")

    SynchronousTestCase.mktemp = mktemp  # type: ignore[method-assign]
    yield
    SynchronousTestCase.mktemp = original  # type: ignore[method-assign]
