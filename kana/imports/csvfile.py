"""CSV export and import of users (SPEC §8).

Export streams ``kana_id,user_id,name,email,billing_id,created_at`` in keyset
chunks, so memory stays flat whatever the number of users. Cells a spreadsheet
would run as a formula are prefixed with ``'`` (and the prefix is taken off
again on import, so an exported file imports back unchanged).

Import takes that file back (any subset of the columns, header required). Each
row is matched by kana_id, else user_id (aliases too), else a single unclaimed
email, and then creates, updates, claims or merges through identity's own
§4.1 functions (a row with a user_id is an identify), with the kana_id and
email-only addressing of a file on top. Rows are applied a chunk at a time
through an ``identity.BatchDirectory``: the chunk's users are preloaded (a few
queries per chunk, not per row), the rules run row by row in memory, in file
order, and the chunk's new and changed users are written at its end with a few
multi-row statements (merges, which are rare, write what is pending and run
the one merge). A chunk whose write fails is re-applied row by row, each in
its own savepoint, so every row succeeds or fails on its own. Re-importing a
file changes nothing.
"""

from __future__ import annotations

import csv
import gc
import io
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, defer, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from kana.domain import features, flags, identity, plans
from kana.domain.billing import check_billing_id, provider_of
from kana.domain.ids import user_id_problem
from kana.errors import KanaError
from kana.models import CsvImport, User, Workspace, utcnow

log = logging.getLogger(__name__)

COLUMNS = ("kana_id", "user_id", "name", "email", "billing_id", "created_at")
# What an import also takes: a plan id per row (SPEC §11; empty leaves the user's plan as is).
IMPORT_COLUMNS = (*COLUMNS, "plan")
MAX_BYTES = 50 * 1024 * 1024
EXPORT_CHUNK = 5000
IMPORT_CHUNK = 1000
# Rows created before an import first refreshes the planner's statistics (then at each doubling).
ANALYZE_AFTER = 10_000
# Entries kept in CsvImport.report per kind (failed rows; created/updated/merged
# rows): the counters stay exact, the line-numbered detail is capped.
REPORT_LIMIT = 5000
# Cells starting with these are run as formulas by spreadsheets (OWASP CSV injection).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_NUMBER = re.compile(r"\d+")


class CsvError(KanaError, ValueError):
    """The file as a whole can't be imported; the message says why and where."""

    code = "invalid_csv"

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message, {"file": message, **({"line": line} if line is not None else {})})
        self.line = line


# --- export -------------------------------------------------------------------


def protect(value: str | None) -> str:
    """A cell a spreadsheet shows as text: formula starters (and a leading ') get a ' prefix."""
    if not value:
        return ""
    if value[0] in _FORMULA or value[0] == "'":
        return "'" + value
    return value


def unprotect(value: str) -> str:
    """Undo ``protect``: drop one ' that precedes a formula starter or another '."""
    if len(value) >= 2 and value[0] == "'" and (value[1] in _FORMULA or value[1] == "'"):
        return value[1:]
    return value


def export_lines(
    session: Session, workspace_id: int, *, flag: str | None = None, chunk: int = EXPORT_CHUNK
) -> Iterator[str]:
    """The workspace's users as CSV text, header first, yielded a chunk of lines at a time.

    ``flag`` (a flag name or ``any``) limits the export to users flagged at the
    last refresh. Keyset pagination on kana_id: each chunk is one indexed
    query, and nothing but the current chunk is held in memory.
    """
    if flag is not None:
        flags.check_flag(flag)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    yield buffer.getvalue()
    stmt = select(User.kana_id, User.user_id, User.name, User.email, User.billing_id, User.created_at).where(
        User.workspace_id == workspace_id
    )
    if flag is not None:
        stmt = stmt.where(User.kana_id.in_(flags.flagged_user_ids_query(workspace_id, flag)))
    last = 0
    while True:
        rows = session.execute(stmt.where(User.kana_id > last).order_by(User.kana_id).limit(chunk)).all()
        if not rows:
            return
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(
            (kana_id, protect(user_id), protect(name), protect(email), protect(billing_id),
             created_at.isoformat() if created_at else "")
            for kana_id, user_id, name, email, billing_id, created_at in rows
        )
        yield buffer.getvalue()
        last = rows[-1][0]


# --- parsing ------------------------------------------------------------------


@dataclass
class Parsed:
    """A file that passed the file-level checks: its columns and records."""

    columns: list[str]
    text: str
    total: int

    def rows(self) -> Iterator[tuple[int, dict[str, str], str | None]]:
        """(line number, {column: value}, error) per non-blank record after the header."""
        reader = csv.reader(io.StringIO(self.text, newline=""))
        next(reader)
        line = reader.line_num + 1
        try:
            for record in reader:
                start, line = line, reader.line_num + 1
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) > len(self.columns):
                    yield start, {}, (f"has {len(record)} cells but the header names {len(self.columns)} columns")
                    continue
                values = {col: unprotect(cell.strip()) for col, cell in zip(self.columns, record, strict=False)}
                yield start, values, None
        except csv.Error as exc:
            raise CsvError(f"line {reader.line_num}: {exc}", reader.line_num) from None


_CANONICAL = {c.replace("_", ""): c for c in IMPORT_COLUMNS}


def _normal_column(name: str) -> str:
    """The column a header cell names, forgiving case and separators ("User ID", "E-mail")."""
    squeezed = re.sub(r"[\s_\-]+", "", name.strip().lower())
    return _CANONICAL.get(squeezed, name.strip())


def _decode(data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CsvError("The file is UTF-16 encoded; save it as \"CSV UTF-8\" and upload it again.")
    if data.startswith(b"PK\x03\x04"):
        raise CsvError("This is a spreadsheet workbook (e.g. .xlsx), not a CSV file; "
                       "save it as \"CSV UTF-8\" and upload that.")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise CsvError(f"This is not a CSV text file (line {line} contains a NUL byte).", line)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CsvError(
            f"The file is not UTF-8 encoded (byte 0x{data[exc.start]:02x} on line {line}); "
            "save it as \"CSV UTF-8\" and upload it again.",
            line,
        ) from None


def parse(data: bytes, *, max_bytes: int = MAX_BYTES) -> Parsed:
    """Check size, encoding and header; raise CsvError with a message a person can act on."""
    if len(data) > max_bytes:
        raise CsvError(f"The file is {len(data) / 1024 / 1024:.1f} MB; the limit is {max_bytes // (1024 * 1024)} MB. "
                       "Split it into smaller files.")
    text = _decode(data)
    if not text.strip():
        raise CsvError(f"The file is empty; the first line must be a header such as {','.join(COLUMNS)}.", 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        total = sum(1 for record in reader if any(cell.strip() for cell in record))
    except csv.Error as exc:
        raise CsvError(f"This is not a valid CSV file (line {reader.line_num}: {exc}).", reader.line_num) from None
    names = [_normal_column(c) for c in header]
    known = set(IMPORT_COLUMNS)
    if not any(n in known for n in names):
        for sep in (";", "\t", "|"):
            if len(header) == 1 and any(_normal_column(c) in known for c in header[0].split(sep)):
                raise CsvError(f"Line 1 is separated by {sep!r}; Kana reads comma-separated files. "
                               "Save it as \"CSV UTF-8 (comma delimited)\".", 1)
        shown = ", ".join(repr(c) for c in header[:6])
        raise CsvError(f"Missing header: line 1 must name the columns (any of {','.join(COLUMNS)}); "
                       f"it reads {shown}.", 1)
    unknown = [header[i] for i, n in enumerate(names) if n not in known]
    if unknown:
        raise CsvError(f"Unknown column{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
                       f"in the header (line 1); the known columns are {','.join(IMPORT_COLUMNS)}.", 1)
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise CsvError(f"Column {n!r} appears twice in the header (line 1).", 1)
        seen.add(n)
    return Parsed(columns=names, text=text, total=total)


# --- applying rows ------------------------------------------------------------


@dataclass
class RowResult:
    line: int
    status: str  # created | updated | merged | unchanged | failed
    user: identity.UserRow | None = None
    kana_id: int | None = None
    errors: dict[str, str] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    def entry(self) -> dict[str, Any]:
        body: dict[str, Any] = {"line": self.line, "status": self.status}
        if self.kana_id is not None:
            body["kana_id"] = self.kana_id
        if self.actions:
            body["actions"] = self.actions
        if self.errors:
            body["errors"] = self.errors
        return body


class RowError(ValueError):
    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


@dataclass(frozen=True)
class Row:
    line: int
    kana_id: int | None
    user_id: str | None
    email: str | None
    name: str | None
    billing_id: str | None
    plan: str | None = None


def validate(line: int, values: dict[str, str], provider: str | None) -> Row:
    """A row's values checked on their own (no database); RowError names each bad field."""
    errors: dict[str, str] = {}
    kana_id = None
    raw = values.get("kana_id") or ""
    if raw:
        if _NUMBER.fullmatch(raw) and len(raw) < 19:
            kana_id = int(raw)
        else:
            errors["kana_id"] = f"{raw!r} is not a kana_id (a whole number)"
    user_id = values.get("user_id") or None
    if user_id is not None and user_id_problem(user_id) == "placeholder":
        errors["user_id"] = f"{user_id!r} is a placeholder, not a user id"
    email = values.get("email") or None
    if email is not None and not _EMAIL.fullmatch(email):
        errors["email"] = f"{email!r} is not an email address"
    billing_id = values.get("billing_id") or None
    if billing_id is not None:
        why = check_billing_id(billing_id, provider)
        if why is None and len(billing_id) > 100:
            why = "must be at most 100 characters"
        if why is not None:
            errors["billing_id"] = f"{billing_id!r} {why}"
    plan = values.get("plan") or None
    if plan is not None and not features.SLUG.fullmatch(plan):
        errors["plan"] = f"{plan!r} is not a plan id"
    if not errors and kana_id is None and user_id is None and email is None:
        errors["row"] = "needs a kana_id, user_id or email to match or create a user"
    if errors:
        raise RowError(errors)
    return Row(line, kana_id, user_id, email, values.get("name") or None, billing_id, plan)


class _Chunk:
    """One chunk's users, loaded in a few queries, and the rules applied row by row in memory.

    A row is an identify (SPEC §4.1) through identity's own functions: the
    shared Directory resolves user_ids and keeps the unclaimed users of the
    chunk's emails, ``update_user`` is rule 1, ``create_or_claim`` rule 2. What
    is the CSV's own is how a row addresses its user: by kana_id first (an
    exported file), or by email alone (no user_id to identify). The rules'
    changes stay in the directory's rows until ``directory.write()``, so later
    rows of the chunk see what earlier rows did.
    """

    def __init__(self, session: Session, workspace_id: int, provider: str | None, rows: list[Row],
                 *, actor: str | None, import_id: int | None) -> None:
        self.session = session
        self.ws = workspace_id
        self.provider = provider
        self.actor = actor
        self.import_id = import_id
        self.directory = identity.BatchDirectory(session, workspace_id)
        self.by_kana: dict[int, identity.UserRow] = self.directory.by_kana_id(
            r.kana_id for r in rows if r.kana_id is not None)
        # Rows that name a user's own kana_id and user_id (a re-imported export)
        # need no second lookup of that user_id.
        known = {}
        for r in rows:
            user = self.by_kana.get(r.kana_id) if r.kana_id is not None else None
            if r.user_id and user is not None and user.user_id == r.user_id:
                known[r.user_id] = user
        for user_id, user in known.items():
            self.directory.remember(user_id, user)
        self.directory.preload(r.user_id for r in rows if r.user_id and r.user_id not in known)
        self.directory.preload_unclaimed(r.email for r in rows if r.email)

    def _forget_merged_away(self) -> None:
        """After a merge: the users it removed are gone for the chunk's later rows too."""
        self.by_kana = {k: u for k, u in self.by_kana.items() if not self.directory.merged_away(u)}

    def _traits(self, row: Row) -> identity.Traits:
        return identity.Traits(
            email=row.email,
            name=row.name,
            billing_id=row.billing_id,
            billing_provider=provider_of(row.billing_id, self.provider) if row.billing_id else None,
        )

    def _cause(self, row: Row) -> dict[str, Any]:
        """How merges this row makes are audited."""
        return {"trigger": "csv", "actor": self.actor, "detail": {"import_id": self.import_id, "line": row.line}}

    # -- the rules

    def apply(self, row: Row) -> RowResult:
        if row.plan is not None:
            # Checked before the row changes anything (a failed row leaves its user as it was).
            try:
                plans.check_plan_id(self.session, self.ws, row.plan)
            except plans.PlanError:
                raise RowError({"plan": f"no plan {row.plan!r} in this workspace"}) from None
        result = self._apply(row)
        if row.plan is not None and result.user is not None and plans.put_on(self.session, result.user, row.plan):
            result.actions.append(f"plan {row.plan}")
            if result.status == "unchanged":
                result.status = "updated"
        return result

    def _apply(self, row: Row) -> RowResult:
        result = RowResult(row.line, "unchanged")
        traits = self._traits(row)
        target: identity.UserRow | None = None
        if row.kana_id is not None:
            target = self.by_kana.get(row.kana_id)
            if target is None and row.user_id is None:
                raise RowError({"kana_id": f"no user with kana_id {row.kana_id} in this workspace "
                                           "(merged or deleted?); clear the cell to match by user_id or email"})
        # A row of a user merged away since the export: its user_id leads to the
        # survivor, whose values win over the row's, as they did in the merge.
        fill_only = False
        if row.user_id is not None:
            owner = self.directory.find(row.user_id)
            if target is None:
                if owner is None:
                    if row.kana_id is not None:
                        raise RowError({"kana_id": f"no user with kana_id {row.kana_id} in this workspace, "
                                                   f"and user_id {row.user_id!r} is unknown too"})
                    # A new user_id: identify rule 2, exactly.
                    return self._result(result, identity.create_or_claim(self.directory, row.user_id, traits, None,
                                                                         source="csv"))
                target = owner
                fill_only = row.kana_id is not None
            elif owner is not None and owner is not target:
                # The row says this kana_id is user_id U, which another user holds: one person.
                billing = row.billing_id or target.billing_id
                if identity.billing_conflict(billing, owner.billing_id):
                    raise RowError({"user_id": f"{row.user_id!r} belongs to kana_id {owner.kana_id}, whose billing "
                                               f"id {owner.billing_id!r} differs from {billing!r}: not merged"})
                target = self.directory.merge([target, owner], **self._cause(row))
                self._forget_merged_away()
                result.status = "merged"
                result.actions.append(f"merged kana_ids {sorted({row.kana_id, owner.kana_id})}")
            elif owner is None:
                if target.user_id is not None:
                    raise RowError({"user_id": f"kana_id {target.kana_id} already has user_id {target.user_id!r}; "
                                               "an import doesn't rename user ids"})
                target.user_id = row.user_id
                self.directory.remember(row.user_id, target)
                result.actions.append("claimed")
        elif target is None:
            assert row.email is not None  # validate() ensures an identifier
            # Addressed by email alone: the one unclaimed user of that email is
            # updated (no user_id to claim with); several can't be told apart.
            candidates = self.directory.unclaimed(row.email)
            if len(candidates) > 1:
                ids = ", ".join(str(u.kana_id) for u in candidates)
                raise RowError({"email": f"{row.email!r} matches {len(candidates)} users without a user_id "
                                         f"(kana_ids {ids}); add a kana_id or user_id to choose"})
            if not candidates:
                created = identity.Identified(self.directory.add(None, traits, None, source="csv"), created=True)
                return self._result(result, created)
            target = candidates[0]
        # identify rule 1 on the user the row addresses.
        done = identity.update_user(self.directory, target, traits, None, only_blanks=fill_only, **self._cause(row))
        return self._result(result, done)

    def _result(self, result: RowResult, done: identity.Identified) -> RowResult:
        result.user = done.user
        if done.claimed:
            result.actions.append("claimed")
        if done.merged_with is not None:
            result.actions.append(f"merged kana_id {done.merged_with}")
            self._forget_merged_away()
        if done.created:
            result.status = "created"
        elif done.merged_with is not None:
            result.status = "merged"
        elif result.status == "unchanged" and (done.changed or result.actions):
            result.status = "updated"
        return result


@dataclass
class Outcome:
    results: list[RowResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)


def apply_rows(
    session: Session,
    workspace_id: int,
    provider: str | None,
    records: Iterable[tuple[int, dict[str, str], str | None]],
    *,
    actor: str | None = None,
    import_id: int | None = None,
) -> Outcome:
    """Apply parsed records (``Parsed.rows()`` items) in the caller's transaction."""
    outcome = Outcome()
    rows: list[Row] = []
    for line, values, error in records:
        if error is not None:
            outcome.results.append(RowResult(line, "failed", errors={"row": error}))
            continue
        try:
            rows.append(validate(line, values, provider))
        except RowError as exc:
            outcome.results.append(RowResult(line, "failed", errors=exc.errors))
    if not rows:
        return outcome
    try:
        with session.begin_nested():
            applied = _apply_chunk(session, workspace_id, provider, rows, actor=actor, import_id=import_id)
    except (IntegrityError, DataError, StaleDataError, identity.Conflict) as exc:
        # Something only the database could tell (a user_id taken meanwhile by a
        # Segment identify, a value too long): find the row, keep the others.
        log.info("CSV chunk failed as a whole (%s); applying its rows one by one", exc)
        applied = _apply_isolated(session, workspace_id, provider, rows, actor=actor, import_id=import_id)
    outcome.results.extend(applied)
    outcome.results.sort(key=lambda r: r.line)
    return outcome


def _apply_chunk(session: Session, workspace_id: int, provider: str | None, rows: list[Row],
                 *, actor: str | None, import_id: int | None) -> list[RowResult]:
    results: list[RowResult] = []
    with session.no_autoflush:
        chunk = _Chunk(session, workspace_id, provider, rows, actor=actor, import_id=import_id)
        for row in rows:
            try:
                results.append(chunk.apply(row))
            except RowError as exc:
                # Rules reject a row before changing anything, so the chunk goes on.
                results.append(RowResult(row.line, "failed", errors=exc.errors))
        chunk.directory.write()
    session.flush()
    for r in results:
        if r.user is not None:
            r.kana_id = r.user.kana_id
            r.user = None
    return results


def _apply_isolated(session: Session, workspace_id: int, provider: str | None, rows: list[Row],
                    *, actor: str | None, import_id: int | None) -> list[RowResult]:
    results = []
    for row in rows:
        try:
            with session.begin_nested():
                results.extend(_apply_chunk(session, workspace_id, provider, [row], actor=actor,
                                            import_id=import_id))
        except (IntegrityError, DataError, StaleDataError, identity.Conflict) as exc:
            message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            results.append(RowResult(row.line, "failed", errors={"row": f"the database refused it: {message}"}))
    return results


# --- the import as a whole -------------------------------------------------------


def _record(session: Session, import_id: int, outcome: Outcome, processed: int) -> None:
    imp = session.get(CsvImport, import_id, options=[defer(CsvImport.report)])
    if imp is None:
        return
    imp.processed = processed
    # The report holds the first REPORT_LIMIT entries of each kind, so the
    # counters say how full it is: once this chunk has nothing to add, the
    # report (megabytes of JSON near the limit) is neither read nor rewritten.
    failed = min(imp.failed, REPORT_LIMIT)
    other = min(imp.created + imp.updated + imp.merged, REPORT_LIMIT)
    for status in ("created", "updated", "merged", "unchanged", "failed"):
        setattr(imp, status, getattr(imp, status) + outcome.count(status))
    if not any((r.status == "failed" and failed < REPORT_LIMIT)
               or (r.status not in ("failed", "unchanged") and other < REPORT_LIMIT) for r in outcome.results):
        return
    report = list(imp.report or [])
    for r in outcome.results:
        if r.status == "unchanged":
            continue
        if r.status == "failed":
            if failed >= REPORT_LIMIT:
                continue
            failed += 1
        else:
            if other >= REPORT_LIMIT:
                continue
            other += 1
        report.append(r.entry())
    imp.report = report


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while batch := list(islice(items, size)):
        yield batch


def create_import(session: Session, workspace_id: int, filename: str | None, job_id: str | None = None) -> CsvImport:
    imp = CsvImport(workspace_id=workspace_id, filename=filename, job_id=job_id, status="queued", report=[])
    session.add(imp)
    session.flush()
    return imp


def run_import(
    sessions: sessionmaker,
    import_id: int,
    data: bytes,
    *,
    progress: Callable[[int, int], None] | None = None,
    actor: str | None = None,
    chunk_size: int = IMPORT_CHUNK,
) -> dict[str, Any]:
    """Import ``data`` for the CsvImport ``import_id``, one transaction per chunk; returns its summary.

    Each chunk commits with its counters, so progress is visible while it runs
    and a crash loses at most the chunk in flight (re-importing is a no-op for
    the rows that made it). File-level problems mark the import failed.
    """
    with sessions.begin() as s:
        imp = s.get(CsvImport, import_id)
        if imp is None:
            raise LookupError(f"no CSV import {import_id}")
        workspace_id = imp.workspace_id
        provider = s.scalar(select(Workspace.billing_provider).where(Workspace.id == workspace_id))
        imp.status = "running"
    try:
        parsed = parse(data)
    except CsvError as exc:
        return finish(sessions, import_id, "failed", exc.message)
    with sessions.begin() as s:
        s.execute(update(CsvImport).where(CsvImport.id == import_id).values(total=parsed.total))
    done = 0
    created = 0
    next_analyze = ANALYZE_AFTER
    try:
        with _collector_spared():
            for batch in _batched(parsed.rows(), chunk_size):
                outcome = _apply_with_retry(sessions, workspace_id, provider, batch, import_id, actor,
                                            done + len(batch))
                done += len(batch)
                created += outcome.count("created")
                if created >= next_analyze:
                    next_analyze = created * 2 if _refresh_statistics(sessions) else float("inf")
                if progress is not None:
                    progress(done, parsed.total)
    except CsvError as exc:
        return finish(sessions, import_id, "failed", exc.message)
    except OperationalError as exc:
        finish(sessions, import_id, "failed", f"the database failed: {str(exc.orig or exc).splitlines()[0]}")
        raise
    return finish(sessions, import_id, "finished", None)


@contextmanager
def _collector_spared() -> Iterator[None]:
    """Keep the garbage collector off the objects that existed before the import while it runs.

    An import allocates millions of short-lived objects, and each full
    collection they trigger walked every long-lived object of the process too
    (modules, SQLAlchemy's caches): 15% of a large import's time. Frozen, those
    are skipped; they go back to the collector's care when the import ends.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _refresh_statistics(sessions: sessionmaker) -> bool:
    """ANALYZE users on PostgreSQL while a bulk import grows a workspace; False when not possible.

    The planner estimates rows per workspace from statistics; for a workspace
    that was new at the last (auto)analyze it expects one row, and then reads
    every lookup of a chunk (by user_id, by email) as a scan of the whole
    workspace — quadratic over a large first import. Autovacuum re-analyzes
    only after 10% of the whole table changed, far too late for that. Only
    workspace_id's statistics are what was stale, and refreshing that column
    alone costs a third of a whole-table ANALYZE.
    """
    with sessions() as s:
        if s.get_bind().dialect.name != "postgresql":
            return False
    try:
        with sessions.begin() as s:
            s.execute(text("ANALYZE users (workspace_id)"))
    except ProgrammingError as exc:  # e.g. the database role doesn't own the table
        log.warning("could not ANALYZE users during a CSV import: %s", exc)
        return False
    return True


def _apply_with_retry(sessions: sessionmaker, workspace_id: int, provider: str | None, batch: list, import_id: int,
                      actor: str | None, processed: int, attempts: int = 3) -> Outcome:
    for attempt in range(attempts):
        try:
            with sessions.begin() as s:
                outcome = apply_rows(s, workspace_id, provider, batch, actor=actor, import_id=import_id)
                _record(s, import_id, outcome, processed)
            return outcome
        except OperationalError as exc:
            # A deadlock with a drain's merge resolves on a fresh try; an outage does not.
            if exc.connection_invalidated or attempt == attempts - 1:
                raise
            log.info("CSV chunk attempt %d failed (%s); retrying", attempt + 1, exc)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def finish(sessions: sessionmaker, import_id: int, status: str, error: str | None) -> dict[str, Any]:
    with sessions.begin() as s:
        imp = s.get(CsvImport, import_id)
        assert imp is not None
        imp.status = status
        imp.error = error
        imp.finished_at = utcnow()
        return import_json(imp, report=False)


def import_json(imp: CsvImport, *, report: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": imp.id,
        "status": imp.status,
        "filename": imp.filename,
        "job_id": imp.job_id,
        "progress": (imp.processed / imp.total if imp.total else (1.0 if imp.status == "finished" else 0.0)),
        "total": imp.total,
        "processed": imp.processed,
        "created": imp.created,
        "updated": imp.updated,
        "merged": imp.merged,
        "unchanged": imp.unchanged,
        "failed": imp.failed,
        "error": imp.error,
        "created_at": imp.created_at.isoformat() if imp.created_at else None,
        "finished_at": imp.finished_at.isoformat() if imp.finished_at else None,
    }
    if report:
        body["report"] = list(imp.report or [])
        body["report_truncated"] = len(body["report"]) < imp.created + imp.updated + imp.merged + imp.failed
    return body


def recent_imports(session: Session, workspace_id: int, limit: int = 20) -> list[CsvImport]:
    return list(
        session.scalars(
            select(CsvImport).where(CsvImport.workspace_id == workspace_id).order_by(CsvImport.id.desc()).limit(limit)
        )
    )
