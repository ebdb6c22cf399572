"""The user-id rule on its own: placeholders and blanks are never user ids; id bounds."""

from __future__ import annotations

import pytest

from kana.domain.ids import MAX_ID, PLACEHOLDER_IDS, in_id_range, user_id_problem

SPELLINGS = sorted(PLACEHOLDER_IDS) + ["None", "NULL", " undefined ", "[object Object]", "NaN"]


@pytest.mark.parametrize("value", SPELLINGS)
def test_placeholders_are_not_user_ids(value):
    assert user_id_problem(value) == "placeholder"


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_blank_is_not_a_user_id(value):
    assert user_id_problem(value) == "empty"


@pytest.mark.parametrize("value", ["u-1", "none-such", "0", "Nonesuch"])
def test_real_ids_pass(value):
    assert user_id_problem(value) is None


def test_id_range():
    assert in_id_range(1) and in_id_range(MAX_ID)
    assert not in_id_range(0) and not in_id_range(-1) and not in_id_range(MAX_ID + 1)


