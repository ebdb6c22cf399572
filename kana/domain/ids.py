"""Identifier rules shared by every surface: what counts as a real user id, and id bounds."""

from __future__ import annotations

# What JavaScript (and sloppy templating) turns a missing id into (SPEC §2):
# never a user, whether it arrives from Segment, the API or a CSV row.
PLACEHOLDER_IDS = frozenset({"null", "undefined", "[object object]", "nan", "none"})

# Primary keys are BIGINT: a larger number in a URL or a file is simply not
# there, and must not reach the database, which would reject it with an overflow.
MAX_ID = 2**63 - 1

# Longest external id (userId, messageId, groupId) the receiver accepts.
MAX_EXTERNAL_ID = 1024


def user_id_problem(value: str) -> str | None:
    """Why ``value`` is not a usable user id ("empty", "placeholder"), or None when it is."""
    stripped = value.strip()
    if not stripped:
        return "empty"
    if stripped.lower() in PLACEHOLDER_IDS:
        return "placeholder"
    return None


def in_id_range(value: int) -> bool:
    """A positive id that fits a BIGINT primary key."""
    return 0 < value <= MAX_ID

# A background job id as RQ accepts it (its JOB_ID_PATTERN), bounded: ours are uuid4 strings.
JOB_ID = r"[A-Za-z0-9_-]{1,128}"
