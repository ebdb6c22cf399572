"""Users: resolution, identify, claims, merges, aliases and deletion (SPEC §4).

One resolution function (``find_user``, cached per transaction by ``Directory``),
one claim rule (``claimable``), one billing-conflict check (``billing_conflict``)
and one merge function (``merge``). identify is built from them (``update_user`` for
rule 1, ``create_or_claim`` for rule 2), and so is the CSV import, which only adds
its own addressing (kana_id, email-only rows) on top. Every caller (identify,
alias, API, CLI, CSV, dashboard) goes through them.

The rules read and set a user's attributes and nothing else, so they run the
same over ORM ``User`` objects (``Directory``) and over the plain ``UserRow``s of
a ``BatchDirectory``, which writes a whole batch's changes with a few multi-row
statements instead of flushing an object per row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, any_, bindparam, delete, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from kana import db, errors
from kana.domain import counters, totals
from kana.models import Alias, Audit, DeadLetter, Event, Usage, User, utcnow

# Fields a merge fills from the merged-away users when the survivor lacks them.
# plan_id too: a paying user merged into an older record without a plan (a
# billing import, say) must not lose their entitlements.
FILLABLE = ("email", "name", "billing_id", "billing_provider", "group_id", "group_name", "plan_id")
CHUNK = 500


class Conflict(errors.Conflict, ValueError):
    """The change would break a uniqueness rule (e.g. a user_id already in use)."""


class Gone(Conflict):
    """A user this transaction changes was merged away or deleted by another one meanwhile.

    A race, like the ORM's StaleDataError: a fresh transaction reads the users again and succeeds.
    """


@dataclass(frozen=True)
class Traits:
    """The identify traits Kana keeps; everything else is dropped."""

    email: str | None = None
    name: str | None = None
    billing_id: str | None = None
    billing_provider: str | None = None
    # From the identify's context (SPEC §3): kept like traits, newest identify wins.
    locale: str | None = None
    timezone: str | None = None

    def present(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def email_key(email: str | None) -> str | None:
    return email.strip().lower() if email else None


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# --- resolution -------------------------------------------------------------


def find_user(session: Session, workspace_id: int, user_id: str) -> User | None:
    """The user whose user_id is ``user_id``, else the one it is an alias of."""
    user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.user_id == user_id))
    if user is not None:
        return user
    return session.scalar(
        select(User)
        .join(Alias, Alias.kana_id == User.kana_id)
        .where(Alias.workspace_id == workspace_id, Alias.alias == user_id)
    )


USERS = User.__table__
# The users columns, which are also User's attribute names (and UserRow's).
FIELDS = tuple(c.key for c in USERS.columns)
_BLANK = dict.fromkeys(FIELDS)


class UserRow:
    """A users row held by a ``BatchDirectory``: User's columns as plain attributes.

    The rules read and set the same attributes on it as on a ``User``; a set
    is noted (the column, and the row in its directory's list of changed rows),
    so the batch's write sends only the rows and columns that changed, without
    the ORM's per-object bookkeeping.
    """

    kana_id: int
    workspace_id: int
    user_id: str | None
    email: str | None
    email_key: str | None
    name: str | None
    billing_id: str | None
    billing_provider: str | None
    group_id: str | None
    group_name: str | None
    source: str
    locale: str | None
    timezone: str | None
    plan_id: str | None
    traits_at: datetime | None
    created_at: datetime
    updated_at: datetime
    gone: bool

    def __init__(self, values: dict[str, Any], sink: list[UserRow] | None = None) -> None:
        state = self.__dict__  # set directly: these are not changes
        if len(values) < len(_BLANK):
            state.update(_BLANK)
        state.update(values)
        state["gone"] = False  # merged away in this transaction
        # Columns set since the row was last written; None while it is not inserted yet.
        state["_changed"] = None if sink is None else set()
        state["_sink"] = sink

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ and self.__dict__[name] == value:
            return  # as with the ORM, setting the value a column has is no change to write
        object.__setattr__(self, name, value)
        changed = self._changed
        if changed is not None:
            if not changed:
                self._sink.append(self)
            changed.add(name)

    def __repr__(self) -> str:
        return f"UserRow(kana_id={self.kana_id!r}, user_id={self.user_id!r})"


class Directory:
    """``find_user`` with a per-transaction cache, preloaded for a whole batch, and the
    unclaimed users of the batch's emails (whom an identify may claim or merge).

    Merges (``Directory.merge``) and deletes clear it (they are rare; correctness beats cleverness).
    The lookups go through ``_select``/``_run``, which hand out ORM ``User`` objects
    here and ``UserRow``s in ``BatchDirectory``: one set of queries for both.
    """

    # Most values one lookup takes (an IN list's parameters).
    piece = CHUNK

    def __init__(self, session: Session, workspace_id: int) -> None:
        self.session = session
        self.workspace_id = workspace_id
        self._cache: dict[str, User | None] = {}
        # email_key -> unclaimed users (no user_id), locked, for a chunk's identify calls.
        self._unclaimed: dict[str, list[User]] = {}

    def _select(self, *lead: Any) -> Select:
        """What a lookup selects: the ``lead`` columns, then the user."""
        return select(*lead, User)

    def _run(self, stmt: Select) -> Iterator[tuple]:
        """A lookup's rows as tuples: the lead columns, then the user."""
        return iter(self.session.execute(stmt))

    def _among(self, column: Any, values: list) -> Any:
        """``column IN values``."""
        return column.in_(values)

    def write(self) -> None:
        """Make the users created or changed so far visible to queries (for ORM objects: a flush)."""
        self.session.flush()

    def preload(self, user_ids: Iterable[str]) -> None:
        wanted = sorted({u for u in user_ids if u not in self._cache})
        for i in range(0, len(wanted), self.piece):
            chunk = wanted[i : i + self.piece]
            found = {
                u.user_id: u
                for (u,) in self._run(
                    self._select().where(User.workspace_id == self.workspace_id, self._among(User.user_id, chunk))
                )
            }
            missing = [u for u in chunk if u not in found]
            if missing:
                rows = self._run(
                    self._select(Alias.alias)
                    .select_from(Alias)
                    .join(User, User.kana_id == Alias.kana_id)
                    .where(Alias.workspace_id == self.workspace_id, self._among(Alias.alias, missing))
                )
                found.update({alias: user for alias, user in rows})
            for u in chunk:
                self._cache[u] = found.get(u)

    def by_kana_id(self, kana_ids: Iterable[int]) -> dict[int, User]:
        """The workspace's users with these kana_ids (the ones that exist)."""
        wanted = sorted(set(kana_ids))
        found: dict[int, User] = {}
        for i in range(0, len(wanted), self.piece):
            stmt = self._select().where(User.workspace_id == self.workspace_id,
                                        self._among(User.kana_id, wanted[i : i + self.piece]))
            found.update((u.kana_id, u) for (u,) in self._run(stmt))
        return found

    def preload_unclaimed(self, emails: Iterable[str]) -> None:
        """Load (and on PostgreSQL lock) the unclaimed users of these emails in one query.

        The lock is what stops two workers from claiming the same unclaimed user;
        rows are locked in kana_id order so two chunks can't wait on each other.
        """
        wanted = sorted({k for k in map(email_key, emails) if k and k not in self._unclaimed})
        for i in range(0, len(wanted), self.piece):
            chunk = wanted[i : i + self.piece]
            for key in chunk:
                self._unclaimed[key] = []
            stmt = (
                self._select()
                .where(User.workspace_id == self.workspace_id, self._among(User.email_key, chunk),
                       User.user_id.is_(None))
                .order_by(User.kana_id)
            )
            if _is_postgres(self.session):
                stmt = stmt.with_for_update()
            for (user,) in self._run(stmt):
                self._unclaimed[user.email_key].append(user)

    def unclaimed(self, email: str, exclude: User | None = None) -> list[User]:
        """Users with this email and no user_id (e.g. Stripe imports), locked; by kana_id, pending ones last.

        Kept in step with the transaction's own changes: a claim, an email
        changed or an unclaimed user created since the preload (``note``).
        """
        key = email_key(email)
        if key not in self._unclaimed:
            self.write()  # pending claims must be visible to the query
            self.preload_unclaimed([email])
        found = [u for u in self._unclaimed[key]
                 if u.user_id is None and u.email_key == key and u is not exclude]
        if len(found) > 1:
            found.sort(key=lambda u: (u.kana_id is None, u.kana_id or 0))
        return found

    def note(self, user: User) -> None:
        """Keep the unclaimed index in step with a user created or re-emailed in this transaction."""
        if user.user_id is None and user.email_key:
            known = self._unclaimed.get(user.email_key)
            if known is not None and not any(u is user for u in known):
                known.append(user)

    def merged_away(self, user: User) -> bool:
        """Whether a merge (or a delete) in this transaction removed ``user``."""
        return sa_inspect(user).was_deleted

    def removed(self, kana_ids: Iterable[int]) -> None:
        """These users were merged away or deleted in this transaction: forget them and what they invalidated.

        ORM objects know it themselves (the session deleted them); see ``BatchDirectory``.
        """
        self.clear()

    def find(self, user_id: str) -> User | None:
        if user_id not in self._cache:
            self._cache[user_id] = find_user(self.session, self.workspace_id, user_id)
        return self._cache[user_id]

    def remember(self, user_id: str, user: User | None) -> None:
        self._cache[user_id] = user

    def clear(self) -> None:
        self._cache.clear()
        self._unclaimed.clear()

    def get_or_create(self, user_id: str, source: str = "segment") -> User:
        user = self.find(user_id)
        if user is None:
            user = self.add(user_id, Traits(), None, source=source)
        return user

    def add(self, user_id: str | None, traits: Traits, at: datetime | None, *, source: str) -> User:
        """A new user (pending: the caller's flush inserts a chunk's users together)."""
        user = new_user(self.session, self.workspace_id, user_id, traits, at, source=source)
        if user_id is not None:
            self.remember(user_id, user)
        self.note(user)
        return user

    def merge(self, users: list[User], *, trigger: str, actor: str | None = None,
              detail: dict | None = None) -> User:
        """``merge``, then forget what it invalidated (merged-away users, their user_ids now aliases)."""
        survivor = merge(self.session, self.workspace_id, users, trigger=trigger, actor=actor, detail=detail)
        self.clear()
        return survivor


class BatchDirectory(Directory):
    """A Directory whose users are ``UserRow``s, written set-based by ``write``.

    The same lookups and the same rules as ``Directory``, for a batch of
    changes (a CSV chunk, a drain job's chunk of Segment calls):
    users are loaded with Core queries into ``UserRow``s (one per kana_id for
    the whole transaction, like the ORM's identity map), and ``write`` sends
    what the rules did since the last write: the new users in one multi-row
    INSERT (their kana_ids drawn up front), changed users in one UPDATE per set
    of changed columns. ``merge`` writes what is pending, then runs the one
    ``merge`` over ORM objects and carries the survivor back into its row.
    Call ``write`` before the transaction ends.
    """

    @property
    def piece(self) -> int:  # type: ignore[override]
        # An array is one parameter however long: a chunk's lookups take one query each.
        return 5000 if _is_postgres(self.session) else CHUNK

    def __init__(self, session: Session, workspace_id: int) -> None:
        super().__init__(session, workspace_id)
        self._rows: dict[int, UserRow] = {}
        self._new: list[UserRow] = []
        self._dirty: list[UserRow] = []  # rows with changes not written yet (each row's sink)

    def _select(self, *lead: Any) -> Select:
        return select(*lead, *USERS.columns)

    def _among(self, column: Any, values: list) -> Any:
        """On PostgreSQL ``column = ANY(array)``: one parameter, where an IN list of a
        thousand has a thousand for SQLAlchemy to render and psycopg to parse on every call."""
        if not _is_postgres(self.session):
            return column.in_(values)
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))

    def _run(self, stmt: Select) -> Iterator[tuple]:
        # Plain rows through the session's connection: no ORM loading, and
        # nothing of this directory waits in the session to be flushed first.
        lead = len(stmt.selected_columns) - len(FIELDS)
        known, sink = self._rows, self._dirty
        for row in self.session.connection().execute(stmt):
            values = row[lead:]
            # The transaction's one UserRow per user: its state here is at least as new as the database's.
            user = known.get(values[0])
            if user is None:
                user = known[values[0]] = UserRow(dict(zip(FIELDS, values, strict=True)), sink)
            yield (*row[:lead], user)

    def merged_away(self, user: UserRow) -> bool:  # type: ignore[override]
        return user.gone

    def removed(self, kana_ids: Iterable[int]) -> None:
        """Their rows are marked gone (nothing of theirs is written again) and leave the directory."""
        for kana_id in kana_ids:
            if (gone := self._rows.pop(kana_id, None)) is not None:
                object.__setattr__(gone, "gone", True)
        self.clear()

    def find(self, user_id: str) -> UserRow | None:  # type: ignore[override]
        if user_id not in self._cache:
            self.preload([user_id])
        return self._cache[user_id]

    def add(self, user_id: str | None, traits: Traits, at: datetime | None, *, source: str) -> UserRow:  # type: ignore[override]
        now = utcnow()
        user = UserRow({"workspace_id": self.workspace_id, "user_id": user_id, "source": source,
                        "created_at": now, "updated_at": now})
        apply_traits(user, traits, at)
        self._new.append(user)
        if user_id is not None:
            self.remember(user_id, user)
        self.note(user)
        return user

    def write(self) -> None:
        """Insert the new users (they get their kana_ids) and update the changed ones."""
        if self._new:
            new, self._new = self._new, []
            # Columns no new user has a value for are left to their NULL default: a shorter document.
            columns = [f for f in FIELDS if f != "kana_id" and any(u.__dict__[f] is not None for u in new)]
            values = [{f: u.__dict__[f] for f in columns} for u in new]
            for user, kana_id in zip(new, db.insert_keyed(self.session, USERS, "kana_id", values), strict=True):
                object.__setattr__(user, "kana_id", kana_id)
                object.__setattr__(user, "_changed", set())
                object.__setattr__(user, "_sink", self._dirty)
                self._rows[kana_id] = user
        if self._dirty:
            changed = list(self._dirty)
            self._dirty.clear()  # the same list: every row holds it
            groups: dict[tuple[str, ...], list[UserRow]] = defaultdict(list)
            for user in changed:
                columns = tuple(sorted(user._changed.intersection(FIELDS)))
                user._changed.clear()
                if columns and not user.gone:
                    groups[columns].append(user)
            now = utcnow()
            for columns, users in groups.items():
                rows = [{"kana_id": u.kana_id, **{c: getattr(u, c) for c in columns}, "updated_at": now}
                        for u in users]
                if db.update_rows(self.session, USERS, "kana_id", rows) < len(rows):
                    raise Gone("a user this batch changes no longer exists")
                for u in users:
                    object.__setattr__(u, "updated_at", now)
            # ORM copies of these users (a caller's, a merge's) must not serve stale values.
            identity_map = self.session.identity_map
            for user in changed:
                held = identity_map.get(identity_key(User, user.kana_id))
                if held is not None:
                    self.session.expire(held)

    def merge(self, users: list[UserRow], *, trigger: str, actor: str | None = None,  # type: ignore[override]
              detail: dict | None = None) -> UserRow:
        """Write what is pending, ``merge`` the users' ORM objects, and carry the outcome back into the rows."""
        self.write()
        ids = sorted({u.kana_id for u in users})
        loaded = list(self.session.scalars(
            select(User).where(User.workspace_id == self.workspace_id, User.kana_id.in_(ids))
            .execution_options(populate_existing=True)
        ))
        if len(loaded) != len(ids):
            raise Gone("a user to merge no longer exists")
        survivor = merge(self.session, self.workspace_id, loaded, trigger=trigger, actor=actor, detail=detail)
        self.removed(k for k in ids if k != survivor.kana_id)
        row = self._rows[survivor.kana_id]
        for name in FIELDS:
            object.__setattr__(row, name, getattr(survivor, name))
        return row


def aliases_of(session: Session, workspace_id: int, kana_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Alias.alias)
            .where(Alias.workspace_id == workspace_id, Alias.kana_id == kana_id)
            .order_by(Alias.alias)
        )
    )


def create_user(
    session: Session,
    workspace_id: int,
    *,
    user_id: str | None = None,
    email: str | None = None,
    name: str | None = None,
    billing_id: str | None = None,
    billing_provider: str | None = None,
    source: str = "api",
) -> User:
    """Create a claimed (with user_id) or unclaimed user; Conflict if the user_id is in use."""
    user_id = user_id or None
    if user_id is not None and find_user(session, workspace_id, user_id) is not None:
        raise Conflict(f"user_id {user_id!r} is already in use in this workspace")
    traits = Traits(email=email or None, name=name or None, billing_id=billing_id or None,
                    billing_provider=billing_provider if billing_id else None)
    user = new_user(session, workspace_id, user_id, traits, None, source=source)
    session.flush()
    return user


def new_user(session: Session, workspace_id: int, user_id: str | None, traits: Traits, at: datetime | None,
             *, source: str) -> User:
    """A new user with these traits, added to the session but not flushed (bulk callers flush a chunk at once)."""
    user = User(workspace_id=workspace_id, user_id=user_id, source=source)
    apply_traits(user, traits, at)
    session.add(user)
    return user


# --- identify ---------------------------------------------------------------


def apply_traits(user: User, traits: Traits, at: datetime | None, *, only_blanks: bool = False) -> bool:
    """Set the traits present; returns whether any value changed.

    An identify older than the last applied one (or ``only_blanks``) only fills blanks.
    """
    newer = not only_blanks and (at is None or user.traits_at is None or at >= user.traits_at)
    changed = False
    for field, value in traits.present().items():
        current = getattr(user, field)
        if current != value and (newer or current is None):
            setattr(user, field, value)
            changed = True
            if field == "email":
                user.email_key = email_key(value)
    if newer and at is not None:
        user.traits_at = at
    return changed


def billing_conflict(*ids: str | None) -> bool:
    """SPEC §4.1 rule 3: two different billing ids are two customers; never merge or claim across them."""
    return len({i for i in ids if i}) > 1


def claimable(directory: Directory, email: str | None, billing_id: str | None, *,
              exclude: User | None = None) -> User | None:
    """The unclaimed user a user with this email and billing id claims or merges (SPEC §4.1), if any.

    Exactly one unclaimed user with the email (``exclude`` aside) and no
    billing conflict with it; none, several, or a conflict → None: nothing is
    claimed or merged, and the flags show the duplicates.
    """
    if not email:
        return None
    candidates = directory.unclaimed(email, exclude=exclude)
    if len(candidates) == 1 and not billing_conflict(billing_id, candidates[0].billing_id):
        return candidates[0]
    return None


@dataclass
class Identified:
    """What ``update_user`` / ``create_or_claim`` did; the CSV import reports it per row."""

    user: User
    created: bool = False
    claimed: bool = False
    merged_with: int | None = None  # kana_id of the unclaimed user merged with ``user``
    changed: bool = False


def update_user(
    directory: Directory,
    user: User,
    traits: Traits,
    at: datetime | None,
    *,
    trigger: str = "identify",
    actor: str | None = None,
    detail: dict | None = None,
    only_blanks: bool = False,
) -> Identified:
    """SPEC §4.1 rule 1: update the existing user A; the single claimable user of the email merges with it."""
    done = Identified(user, changed=apply_traits(user, traits, at, only_blanks=only_blanks))
    directory.note(user)
    # An unclaimed user is itself one of C: unclaimed users sharing an email stay apart.
    other = claimable(directory, traits.email, user.billing_id, exclude=user) if user.user_id is not None else None
    if other is not None:
        done.user = directory.merge([user, other], trigger=trigger, actor=actor, detail=detail)
        done.merged_with = other.kana_id
        # The triggering call's values win over both users'.
        apply_traits(done.user, traits, at, only_blanks=only_blanks)
    return done


def create_or_claim(directory: Directory, user_id: str, traits: Traits, at: datetime | None, *,
                    source: str = "segment") -> Identified:
    """SPEC §4.1 rule 2 (no user has ``user_id``): the claimable user claims it, else a new user is created."""
    user = claimable(directory, traits.email, traits.billing_id)
    if user is None:
        return Identified(directory.add(user_id, traits, at, source=source), created=True)
    user.user_id = user_id  # the unclaimed user (e.g. a Stripe import) claims this id
    changed = apply_traits(user, traits, at)
    directory.remember(user_id, user)
    return Identified(user, claimed=True, changed=changed)


def identify(directory: Directory, user_id: str, traits: Traits, at: datetime | None) -> User:
    """SPEC §4.1: create, update, claim or merge the user identified by ``user_id``."""
    user = directory.find(user_id)
    if user is None:
        return create_or_claim(directory, user_id, traits, at).user
    user = update_user(directory, user, traits, at, trigger="identify", detail={"user_id": user_id}).user
    directory.remember(user_id, user)
    return user


# --- merge ------------------------------------------------------------------


def _lock(session: Session, users: list[User]) -> list[User]:
    """Re-read the users locked (PostgreSQL), in kana_id order to avoid lock cycles."""
    if not _is_postgres(session):
        return users
    ids = sorted(u.kana_id for u in users)
    locked = list(
        session.scalars(
            select(User).where(User.kana_id.in_(ids)).order_by(User.kana_id).with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    return locked


def merge(
    session: Session,
    workspace_id: int,
    users: list[User],
    *,
    trigger: str,
    actor: str | None = None,
    detail: dict | None = None,
) -> User:
    """Merge users into the one created first (ties: lowest kana_id). SPEC §4.3.

    The survivor keeps its values and fills blanks from the others (in creation
    order); events, usage and aliases move to it; the others' user_ids become its
    aliases; the others are removed; the merge is audited.
    """
    session.flush()  # users created earlier in this chunk need their kana_id
    unique = {u.kana_id: u for u in users}
    if len(unique) < 2:
        raise ValueError("a merge needs at least two distinct users")
    if any(u.workspace_id != workspace_id for u in unique.values()):
        raise ValueError("users of another workspace cannot be merged")
    ordered = sorted(_lock(session, list(unique.values())), key=lambda u: (u.created_at, u.kana_id))
    if len(ordered) != len(unique):
        raise Gone("a user to merge no longer exists")
    survivor, others = ordered[0], ordered[1:]
    other_ids = [u.kana_id for u in others]

    for model in (Event, Usage, Alias):
        session.execute(
            update(model)
            .where(model.workspace_id == workspace_id, model.kana_id.in_(other_ids))
            .values(kana_id=survivor.kana_id)
            .execution_options(synchronize_session=False)
        )
    totals.move(session, workspace_id, other_ids, survivor.kana_id)
    for field in FILLABLE:
        if getattr(survivor, field) is None:
            value = next((getattr(o, field) for o in others if getattr(o, field) is not None), None)
            setattr(survivor, field, value)
    survivor.email_key = email_key(survivor.email)
    stamps = [u.traits_at for u in ordered if u.traits_at is not None]
    survivor.traits_at = max(stamps) if stamps else None

    other_user_ids = [o.user_id for o in others if o.user_id]
    adopted = None
    if survivor.user_id is None and other_user_ids:
        adopted = other_user_ids.pop(0)
    snapshot = {
        "survivor": {"kana_id": survivor.kana_id, "user_id": survivor.user_id},
        "merged": [{"kana_id": o.kana_id, "user_id": o.user_id, "created_at": o.created_at.isoformat()}
                   for o in others],
        **(detail or {}),
    }
    for other in others:
        session.delete(other)
    # The merged-away rows must be gone before their user_id moves (unique per workspace).
    session.flush()
    if adopted is not None:
        survivor.user_id = adopted
    for alias in other_user_ids:
        session.add(Alias(workspace_id=workspace_id, alias=alias, kana_id=survivor.kana_id))
    session.add(
        Audit(
            workspace_id=workspace_id,
            action="merge",
            trigger=trigger,
            actor=actor,
            survivor_kana_id=survivor.kana_id,
            kana_ids=[u.kana_id for u in ordered],
            detail=snapshot,
        )
    )
    session.flush()
    counters.touch(session, workspace_id)
    return survivor


# --- alias ------------------------------------------------------------------


def alias(directory: Directory, previous_id: str, user_id: str, *, at: datetime | None = None) -> User | None:
    """SPEC §4.4: rename (P exists, U doesn't), merge (both exist) or record a no-op.

    Users change through the directory (ORM objects or a batch's rows), so the
    renames are written with ``directory.write()``; the alias and audit records
    are ORM objects either way.
    """
    session, ws = directory.session, directory.workspace_id
    previous = directory.find(previous_id)
    current = directory.find(user_id)
    result = "noop"
    user = current
    if previous is not None and current is None:
        old = previous.user_id
        previous.user_id = user_id
        directory.write()
        if old and old != user_id:
            session.add(Alias(workspace_id=ws, alias=old, kana_id=previous.kana_id))
        user, result = previous, "renamed"
        directory.clear()
        counters.touch(session, ws)
    elif previous is not None and current is not None and previous is not current:
        if billing_conflict(previous.billing_id, current.billing_id):
            result = "billing_conflict"
        else:
            user = directory.merge([previous, current], trigger="alias",
                                   detail={"previous_id": previous_id, "user_id": user_id})
            if user.user_id != user_id:
                # The call's userId is the identity going forward (its payload wins
                # over both users): it becomes the survivor's user_id, the old one an alias.
                session.execute(delete(Alias).where(Alias.workspace_id == ws, Alias.alias == user_id))
                if user.user_id:
                    session.add(Alias(workspace_id=ws, alias=user.user_id, kana_id=user.kana_id))
                user.user_id = user_id
            result = "merged"
            directory.clear()
    session.add(
        Audit(
            workspace_id=ws,
            action="alias",
            trigger="alias",
            survivor_kana_id=user.kana_id if user is not None else None,
            kana_ids=[u.kana_id for u in (previous, current) if u is not None],
            detail={"previous_id": previous_id, "user_id": user_id, "result": result},
        )
    )
    # The survivor's new user_id must be in the table before a later call looks it up.
    directory.write()
    session.flush()
    return user


# --- deletion ---------------------------------------------------------------


def delete_users(
    session: Session, workspace_id: int, kana_ids: list[int], *, trigger: str, actor: str | None = None,
    gdpr: bool = False,
) -> int:
    """Delete users with their usage, events and aliases; audited. Returns users deleted."""
    ids = sorted(set(kana_ids))
    if not ids:
        return 0
    session.flush()
    users = list(session.scalars(select(User).where(User.workspace_id == workspace_id, User.kana_id.in_(ids))))
    if not users:
        return 0
    ids = [u.kana_id for u in users]
    user_ids = [u.user_id for u in users if u.user_id]
    counts = {}
    for name, model in (("usage", Usage), ("events", Event), ("aliases", Alias)):
        counts[name] = session.execute(
            delete(model)
            .where(model.workspace_id == workspace_id, model.kana_id.in_(ids))
            .execution_options(synchronize_session=False)
        ).rowcount
    totals.drop(session, workspace_id, kana_ids=ids)
    if gdpr and user_ids:
        counts["dead_letters"] = session.execute(
            delete(DeadLetter).where(DeadLetter.workspace_id == workspace_id, DeadLetter.user_id.in_(user_ids))
        ).rowcount
    for user in users:
        session.delete(user)
    if gdpr:
        # Earlier merge records name this user's ids; only a PII-free trace may remain.
        session.execute(
            update(Audit)
            .where(Audit.workspace_id == workspace_id, Audit.survivor_kana_id.in_(ids))
            .values(detail={"redacted": "gdpr"})
        )
        detail = {"users": len(users), **counts}
    else:
        detail = {"users": [{"kana_id": u.kana_id, "user_id": u.user_id} for u in users], **counts}
    session.add(
        Audit(
            workspace_id=workspace_id,
            action="gdpr_delete" if gdpr else "delete",
            trigger=trigger,
            actor=actor,
            kana_ids=ids,
            detail=detail,
        )
    )
    session.flush()
    counters.touch(session, workspace_id)
    return len(users)


def gdpr_delete(directory: Directory, user_id: str) -> int:
    """SPEC §4.6: remove the user U resolves to, with events, usage and aliases."""
    user = directory.find(user_id)
    if user is None:
        return 0
    directory.write()  # a user created in this transaction needs its kana_id, pending changes their row
    n = delete_users(directory.session, directory.workspace_id, [user.kana_id], trigger="delete", gdpr=True)
    directory.removed([user.kana_id])
    return n

