"""Integration tests: every test ends with the usage totals equal to the ledger's sums."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import helpers


@pytest.fixture(autouse=True)
def totals_follow_the_ledger(app) -> Iterator[None]:
    # Whatever a test did to usage (chunks, merges, deletes, reprocessing, imports),
    # the running totals the entitlement checks read must still be the ledger's sums.
    yield
    assert helpers.totals_mismatches() == []
