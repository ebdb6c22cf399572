"""Database schema. Every row belongs to a workspace; every query filters by it."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Amount(TypeDecorator):
    """Usage amounts: exact decimals on PostgreSQL, stored as text-free REAL on SQLite."""

    impl = Numeric(28, 9)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "sqlite":
            # SQLite has no decimal type; avoid SQLAlchemy's lossy-Decimal warning.
            from sqlalchemy import Float

            return dialect.type_descriptor(Float())
        return dialect.type_descriptor(Numeric(28, 9))

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        return float(value) if dialect.name == "sqlite" else Decimal(str(value))

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        return None if value is None else Decimal(str(value))


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[dict[str, Any]]: JSON, list[int]: JSON}


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    billing_provider: Mapped[str | None] = mapped_column(String(20))
    stripe_api_key: Mapped[str | None] = mapped_column(Text)
    chargebee_site: Mapped[str | None] = mapped_column(String(200))
    chargebee_api_key: Mapped[str | None] = mapped_column(Text)
    # Segment's "shared secret": /segment/{id} verifies X-Signature (HMAC-SHA1 of
    # the body) with it, so it is kept in clear like the billing API keys.
    segment_shared_secret: Mapped[str | None] = mapped_column(Text)
    # Keep context.ip of events (personal data: off unless the workspace opts in).
    keep_ip: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Where usage alerts are POSTed (SPEC §11) and the secret that signs them.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    # The key itself is never stored: only its SHA-256 (keys are 256-bit random,
    # so a fast hash is enough) and a short prefix to recognise it by.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(10))  # ingest | check | admin
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("workspace_id", "user_id", name="uq_users_workspace_user_id"),
        Index("ix_users_workspace_email", "workspace_id", "email_key"),
        Index("ix_users_workspace_billing", "workspace_id", "billing_id"),
    )

    kana_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    # NULL, never "", when the user has no external id (e.g. a Stripe import).
    user_id: Mapped[str | None] = mapped_column(Text)
    email: Mapped[str | None] = mapped_column(Text)
    # Lower-cased email: emails compare case-insensitively.
    email_key: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    billing_id: Mapped[str | None] = mapped_column(String(100))
    billing_provider: Mapped[str | None] = mapped_column(String(20))
    group_id: Mapped[str | None] = mapped_column(Text)
    group_name: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(20))  # segment|stripe|chargebee|csv|api
    # context.locale / context.timezone of the newest identify (SPEC §3).
    locale: Mapped[str | None] = mapped_column(String(100))
    timezone: Mapped[str | None] = mapped_column(String(100))
    # The user's plan (SPEC §11); no foreign key: plans are keyed by (workspace, id)
    # and kana.domain.plans checks the id on assignment.
    plan_id: Mapped[str | None] = mapped_column(String(100))
    # Timestamp of the newest identify applied: older ones only fill blanks.
    traits_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Alias(Base):
    """A user_id that now resolves to another user (after a merge or alias call)."""

    __tablename__ = "aliases"

    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(Text, primary_key=True)
    kana_id: Mapped[int] = mapped_column(ForeignKey("users.kana_id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("workspace_id", "message_id", name="uq_events_workspace_message"),
        Index("ix_events_workspace_status", "workspace_id", "status", "id"),
        Index("ix_events_kana_id", "kana_id", "timestamp"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    message_id: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(20))
    # track: event name; page/screen: page name; group: groupId.
    name: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(Text)
    kana_id: Mapped[int | None] = mapped_column(ForeignKey("users.kana_id"))
    timestamp: Mapped[datetime]
    received_at: Mapped[datetime]
    properties: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # What Segment sent about the call: the kept part of ``context`` (library,
    # locale, timezone, userAgent, page, campaign; ip when the workspace keeps
    # IPs) and the sender's originalTimestamp / sentAt / receivedAt (Kana's own
    # receipt time is received_at). NULL when the call carried none.
    context: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timestamps: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # processed (identify/group/alias), mapped or unmapped (track/page/screen)
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    feature_id: Mapped[str | None] = mapped_column(String(100))
    processed_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Lets a chunk attach events to users created in the same chunk and insert
    # them all in one flush (the kana_id is only known after the user's INSERT).
    user: Mapped[User | None] = relationship()


class Feature(Base):
    __tablename__ = "features"

    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(20))  # consumable | binary
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Usage(Base):
    """The ledger billing runs on: one row per event at most."""

    __tablename__ = "usage"
    __table_args__ = (
        Index("ix_usage_user_feature_at", "workspace_id", "kana_id", "feature_id", "at"),
        Index("ix_usage_feature_at", "workspace_id", "feature_id", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    kana_id: Mapped[int] = mapped_column(ForeignKey("users.kana_id"))
    feature_id: Mapped[str] = mapped_column(String(100))
    delta: Mapped[Decimal] = mapped_column(Amount)
    at: Mapped[datetime]
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Lets a chunk add an event and its usage together and insert both in one flush.
    event: Mapped[Event] = relationship()
    user: Mapped[User] = relationship()


class UsageTotal(Base):
    """Running usage totals per user, feature and calendar-UTC day and month.

    What entitlement checks and alerts read instead of summing the ledger: kept in
    the same transaction as every change to ``usage`` (``kana.domain.totals``), so
    they are exactly the ledger's sums. Lifetime totals add up the month rows.
    """

    __tablename__ = "usage_totals"

    workspace_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # No foreign key: rows go with their user (merge, delete) in the same transaction,
    # and a chunk need not lock the user row a second time.
    kana_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    feature_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    period: Mapped[str] = mapped_column(String(5), primary_key=True)  # day | month
    start: Mapped[datetime] = mapped_column(primary_key=True)
    total: Mapped[Decimal] = mapped_column(Amount)


class Audit(Base):
    """Merges, deletes and alias calls: who or what triggered them, ids, time."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_workspace_at", "workspace_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    action: Mapped[str] = mapped_column(String(30))  # merge | delete | gdpr_delete | alias
    trigger: Mapped[str] = mapped_column(String(30))  # identify|alias|api|cli|csv|dashboard|delete
    actor: Mapped[str | None] = mapped_column(Text)
    survivor_kana_id: Mapped[int | None] = mapped_column(BigInteger)
    kana_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class DeadLetter(Base):
    """An accepted call that failed processing for a data reason: kept, shown, retryable."""

    __tablename__ = "dead_letters"
    __table_args__ = (UniqueConstraint("workspace_id", "message_id", name="uq_dead_workspace_message"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    message_id: Mapped[str] = mapped_column(String(200))
    # Kept so a GDPR delete can find (and remove) a user's failed calls too.
    user_id: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Rule(Base):
    """A no-code mapping from calls (event name, optional type, AND conditions) to a feature."""

    __tablename__ = "rules"
    __table_args__ = (Index("ix_rules_workspace_priority", "workspace_id", "priority", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    feature_id: Mapped[str] = mapped_column(String(100))
    event: Mapped[str] = mapped_column(Text)
    # None: any mappable call type (track, page, screen) with that name.
    type: Mapped[str | None] = mapped_column(String(20))
    conditions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    delta_property: Mapped[str | None] = mapped_column(Text)
    # Lower runs first; the first matching rule wins.
    priority: Mapped[int] = mapped_column(Integer, default=100)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UserFlag(Base):
    """The current flag set of a workspace, rebuilt atomically by the flags job (SPEC §6)."""

    __tablename__ = "user_flags"
    __table_args__ = (Index("ix_user_flags_email", "workspace_id", "flag", "email_key"),)

    # No foreign key: derived data, and a check per inserted row slowed big refreshes (migration 0004).
    workspace_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    flag: Mapped[str] = mapped_column(String(30), primary_key=True)  # missing_billing_id | duplicate_email
    kana_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # For duplicate_email: the shared (lower-cased) email the group is keyed by.
    email_key: Mapped[str | None] = mapped_column(Text)


class FlagRefresh(Base):
    """When a workspace's flags were last rebuilt, and their counts then."""

    __tablename__ = "flag_refreshes"

    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    refreshed_at: Mapped[datetime]
    missing_billing_id: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_email: Mapped[int] = mapped_column(Integer, default=0)
    duplicate_groups: Mapped[int] = mapped_column(Integer, default=0)


class CsvImport(Base):
    """One CSV import: progress counters and the line-numbered report."""

    __tablename__ = "csv_imports"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    filename: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="queued")  # queued|running|finished|failed
    job_id: Mapped[str | None] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    merged: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # [{"line": n, "status": "failed", "errors": {...}}, ...] (failed rows; capped)
    report: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class DashboardAdmin(Base):
    """A person who logs in to the operator dashboard; sees only their workspace."""

    __tablename__ = "dashboard_admins"
    __table_args__ = (UniqueConstraint("workspace_id", "email", name="uq_dashboard_admins_workspace_email"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), index=True)
    # Stored lower-cased: logins compare emails case-insensitively.
    email: Mapped[str] = mapped_column(String(320))
    # werkzeug's scrypt hash ("scrypt:32768:8:1$salt$hash"); never the password.
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]
    # An installation operator also reaches /rq (rq-dashboard), which shows every
    # workspace's jobs; made only by the CLI (``kana admin create --operator``).
    operator: Mapped[bool] = mapped_column(default=False, server_default=false())


class DashboardSession(Base):
    """A logged-in dashboard session: the signed cookie names it, so logging out can end it on the server."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("dashboard_admins.id", ondelete="CASCADE"), index=True)
    # Random, in the cookie beside the id: a row id the database hands out again
    # (SQLite reuses the highest) cannot revive an ended session's cookie.
    nonce: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Plan(Base):
    """A bundle of feature entitlements (SPEC §11); a user has at most one."""

    __tablename__ = "plans"

    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PlanFeature(Base):
    """One feature of a plan: its limit per period (consumable) or just presence (binary)."""

    __tablename__ = "plan_features"
    __table_args__ = (Index("ix_plan_features_feature", "workspace_id", "feature_id"),)

    workspace_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    feature_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    # None: unlimited.
    limit: Mapped[Decimal | None] = mapped_column(Amount)
    period: Mapped[str] = mapped_column(String(10), default="month")  # month | day | none
    overage: Mapped[bool] = mapped_column(default=False)
    # Alert thresholds in percent of the limit, e.g. [80, 100].
    thresholds: Mapped[list[int]] = mapped_column(JSON, default=list)


class Alert(Base):
    """A threshold crossing: at most one per (user, feature, threshold, period), whatever replays."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("workspace_id", "kana_id", "feature_id", "threshold", "period_start",
                         name="uq_alerts_crossing"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(BigId)
    # No foreign key: an alert outlives a user deleted later (its delivery still goes out).
    kana_id: Mapped[int] = mapped_column(BigInteger)
    feature_id: Mapped[str] = mapped_column(String(100))
    threshold: Mapped[int] = mapped_column(Integer)
    # Lifetime ("none") periods use the epoch, so the key is never NULL.
    period_start: Mapped[datetime]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One webhook to send (or sent): payload, attempts and when to try next."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
                      Index("ix_webhook_deliveries_workspace", "workspace_id", "id"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id"))
    alert_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    type: Mapped[str] = mapped_column(String(50))
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]


# The dashboard's events-per-hour chart reads a workspace's recent events by
# arrival time; without this index that is a scan of all its events.
Index("ix_events_workspace_received", Event.workspace_id, Event.received_at)
