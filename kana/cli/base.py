"""What every ``kana`` command shares: the root group, settings, sessions, and the rendering of errors."""

from __future__ import annotations

from typing import Any

import click
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

import config
from kana import errors
from kana.errors import KanaError

# sysexits.h EX_TEMPFAIL: Redis or the database is down; running the command again later may work.
EXIT_UNAVAILABLE = 75
LOWER_CASE_OPENINGS = {"No", "Invalid"}


def _settings() -> config.Settings:
    return config.load()


def _session():  # noqa: ANN202
    from kana import db
    from kana.runtime import Runtime

    # A Runtime, not just the engine: merges and deletes must reach the entitlement cache after commit.
    Runtime(_settings())
    return db.SessionLocal


def _runtime():  # noqa: ANN202
    from kana.runtime import Runtime

    return Runtime(_settings())


class _Failed(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _failure(exc: Exception, params: dict[str, Any]) -> click.ClickException | None:
    """The CLI's rendering of ``kana.errors``: a message in its own words and an exit code.

    The openings the error model writes ("No rule 5 …", "Invalid feature id: …")
    start lower-case like click's own messages (others may start with a name,
    e.g. Stripe, and stay as they are), and "this workspace" is the one the
    command named: the CLI has no workspace of its own.
    """
    known = errors.classify(exc)
    if known is None:
        return None
    text = known.text.rstrip(".")
    if text.split(" ", 1)[0] in LOWER_CASE_OPENINGS:
        text = text[:1].lower() + text[1:]
    if params.get("workspace_id") is not None:
        text = text.replace("this workspace", f"workspace {params['workspace_id']}")
    return _Failed(text, EXIT_UNAVAILABLE if known.status == 503 else 1)


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KanaError, RedisError, DBAPIError) as exc:
            failure = _failure(exc, ctx.params)
            if failure is None:
                raise
            raise failure from None


class _Group(click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too


@click.group(cls=_Group)
def main() -> None:
    """Kana's Segment destination."""


def _require_workspace(s, workspace_id: int) -> None:  # noqa: ANN001
    from kana.models import Workspace

    if s.get(Workspace, workspace_id) is None:
        raise click.ClickException(f"no workspace {workspace_id}")
