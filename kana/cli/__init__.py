"""The ``kana`` command line: database, workspaces, keys, features and the dev stack."""

from __future__ import annotations

import json
import sys

import click

from kana.cli.base import _require_workspace, _runtime, _session, _settings, main


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the database named by DATABASE_URL to the latest schema."""
    from kana import migrate

    url = _settings().database_url
    migrate.upgrade(url, revision)
    click.echo(f"database at {_redact(url)} is at {revision}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@main.group()
def workspace() -> None:
    """Workspaces (one per Kana customer)."""


@workspace.command("create")
@click.argument("name")
@click.option("--billing-provider", type=click.Choice(["stripe", "chargebee"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print {workspace_id, api_key} as JSON.")
def workspace_create(name: str, billing_provider: str | None, as_json: bool) -> None:
    """Create a workspace and print its admin API key (shown once)."""
    from kana.domain import keys

    with _session().begin() as s:
        ws, key = keys.create_workspace(s, name, billing_provider)
        ws_id = ws.id
    if as_json:
        click.echo(json.dumps({"workspace_id": ws_id, "api_key": key}))
    else:
        click.echo(f"workspace {ws_id} created; admin API key (shown once): {key}")


@workspace.command("update")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--name", default=None)
@click.option("--segment-shared-secret", default=None, metavar="SECRET",
              help="Segment's shared secret for /segment/{workspace_id} signing; '-' reads it from stdin "
                   "(keeps it out of the shell history), '' removes it.")
@click.option("--keep-ip/--no-keep-ip", default=None, help="Keep context.ip of events (off by default).")
def workspace_update(workspace_id: int, name: str | None, segment_shared_secret: str | None,
                     keep_ip: bool | None) -> None:
    """Change workspace settings (the shared secret is never printed)."""
    from kana.services import workspace as workspace_actions

    changes: dict[str, object] = {}
    if name is not None:
        changes["name"] = name
    if segment_shared_secret is not None:
        changes["segment_shared_secret"] = (sys.stdin.readline() if segment_shared_secret == "-"
                                            else segment_shared_secret)
    if keep_ip is not None:
        changes["keep_ip"] = keep_ip
    if not changes:
        raise click.UsageError("nothing to change: give --name, --segment-shared-secret or --keep-ip/--no-keep-ip")
    _session()  # binds SessionLocal to DATABASE_URL
    row = workspace_actions.update(workspace_id, changes)
    state = {"shared secret": "set" if row["segment_shared_secret_set"] else "not set", "keep_ip": row["keep_ip"]}
    # Running web processes pick the change up within the key cache TTL.
    click.echo(f"workspace {workspace_id} updated ({', '.join(f'{k}: {v}' for k, v in state.items())})")


@main.group()
def key() -> None:
    """API keys."""


@key.command("create")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--scope", type=click.Choice(["ingest", "check", "admin"]), default="ingest", show_default=True)
@click.option("--name", default=None)
@click.option("--json", "as_json", is_flag=True)
def key_create(workspace_id: int, scope: str, name: str | None, as_json: bool) -> None:
    """Create an API key (printed once)."""
    from kana.services import keys

    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    created = keys.create(workspace_id, scope, name)
    if as_json:
        click.echo(json.dumps({"key_id": created["id"], "id": created["id"], "scope": scope,
                               "api_key": created["api_key"]}))
    else:
        click.echo(f"key {created['id']} ({scope}): {created['api_key']}")


@key.command("revoke")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("key_id", type=int)
def key_revoke(workspace_id: int, key_id: int) -> None:
    """Revoke an API key (takes effect within the key cache TTL)."""
    from kana import broker
    from kana.services import keys

    settings = _settings()
    _session()
    # Removes the key's Redis record too (kana.domain.keys); not worth starting an embedded Redis for.
    keys.revoke(workspace_id, key_id, redis=broker.connect(settings) if settings.redis_url else None)
    click.echo(f"key {key_id} revoked")


@key.command("list")
@click.option("--workspace", "workspace_id", type=int, required=True)
def key_list(workspace_id: int) -> None:
    """List a workspace's API keys (id, prefix, scope, active/revoked, name)."""
    from kana.domain import keys

    with _session()() as s:
        for row in keys.list_keys(s, workspace_id):
            state = "revoked" if row.revoked_at else "active"
            click.echo(f"{row.id}\t{row.prefix}…\t{row.scope}\t{state}\t{row.name or ''}")


@main.group()
def feature() -> None:
    """Features usage is recorded against (the same rules as /api/v1/features)."""


@feature.command("create")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("feature_id")
@click.option("--name", default=None, help="Display name (default: the id).")
@click.option("--type", "kind", default="consumable", show_default=True, metavar="consumable|binary")
@click.option("--json", "as_json", is_flag=True, help="Print the feature (and the reprocessing job id) as JSON.")
def feature_create(workspace_id: int, feature_id: str, name: str | None, kind: str, as_json: bool) -> None:
    """Create a feature; queues reprocessing of stored events naming it."""
    from kana.services import features

    rt = _runtime()
    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    body = _not_queued(features.create(rt, workspace_id, feature_id, name, kind), workspace_id)
    if as_json:
        click.echo(json.dumps(body))
        return
    click.echo(f"feature {body['id']} created")
    if body["job_id"]:
        click.echo(f"reprocessing job {body['job_id']} queued")


@feature.command("list")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--json", "as_json", is_flag=True)
def feature_list(workspace_id: int, as_json: bool) -> None:
    """List the workspace's features (id, type, name)."""
    from kana.services import features

    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    rows = features.listed(workspace_id)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for f in rows:
        click.echo(f"{f['id']}\t{f['type']}\t{f['name']}")


@feature.command("update")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("feature_id")
@click.option("--name", default=None, help="New display name.")
@click.option("--type", "kind", default=None, metavar="consumable|binary", help="New type.")
@click.option("--json", "as_json", is_flag=True)
def feature_update(workspace_id: int, feature_id: str, name: str | None, kind: str | None, as_json: bool) -> None:
    """Rename or retype a feature (its id is what events name, so it never changes)."""
    from kana.services import features

    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    body = features.update(workspace_id, feature_id, name=name, kind=kind)
    if as_json:
        click.echo(json.dumps(body))
    else:
        click.echo(f"feature {body['id']} updated: {body['type']}, {body['name']!r}")


@feature.command("delete")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("feature_id")
@click.option("--force", is_flag=True, help="Also delete its usage (those events become unmapped again).")
def feature_delete(workspace_id: int, feature_id: str, force: bool) -> None:
    """Delete a feature; one with recorded usage only with --force."""
    from kana.domain.features import FeatureInUse
    from kana.services import features

    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    try:
        features.delete(workspace_id, feature_id, force=force)
    except FeatureInUse as exc:
        raise click.ClickException(f"{exc}: add --force.") from None
    click.echo(f"feature {feature_id} deleted")


@main.command()
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--verbose", is_flag=True, help="Also log routine jobs (each drain, the 30 s recover scan).")
def dev(port: int, workers: int, verbose: bool) -> None:
    """Run web + workers + scheduler on this machine (embedded SQLite/Redis by default)."""
    # Not ``from kana.cli import dev``: that name is this command, not the module.
    from kana.cli.dev import run

    sys.exit(run(_settings(), port=port, workers=workers, verbose=verbose))


@main.command()
def recover() -> None:
    """Re-wake partitions whose events no live drain holds."""
    import jobs
    from jobs import maintenance

    jobs.init(_settings())
    click.echo(json.dumps(maintenance.recover()))


# --- mapping rules and reprocessing (SPEC §7) --------------------------------------------


def _not_queued(saved: dict, workspace_id: int) -> dict:
    """A saved change whose reprocessing Redis being down left out: say how to run it (on stderr)."""
    if saved.pop("reprocess_error", None):
        click.echo(f"the change is saved, but reprocessing was not queued (Redis is unreachable); "
                   f"run `kana reprocess --workspace {workspace_id}`", err=True)
    return saved


def _reprocess_inline(workspace_id: int, chunk: int) -> dict:
    from kana.domain import reprocess

    sessions = _session()
    with sessions() as s:
        total = reprocess.count_unmapped(s, workspace_id)
    with click.progressbar(length=max(total, 1), label=f"reprocessing {total} unmapped events",
                           show_pos=True, show_eta=True, file=sys.stderr) as bar:
        done = 0

        def advance(state: reprocess.Progress) -> None:
            nonlocal done
            bar.update(min(state.scanned, bar.length) - done)
            done = min(state.scanned, bar.length)

        state = reprocess.reprocess(sessions, workspace_id, progress=advance, chunk=chunk)
    return {"scanned": state.scanned, "mapped": state.mapped}


@main.group()
def rule() -> None:
    """Mapping rules: which calls count as usage of which feature."""


@rule.command("create")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--feature", "feature_id", required=True, help="The feature the matched calls are usage of.")
@click.option("--event", required=True, help="Event name (track) or page/screen name.")
@click.option("--type", "kind", type=click.Choice(["track", "page", "screen"]), default=None,
              help="Only this call type (default: any of track, page, screen).")
@click.option("--condition", "conditions", type=(str, str, str), multiple=True, metavar="PROPERTY OPERATOR VALUE",
              help="An AND condition, e.g. --condition plan.tier equals pro --condition seats gt 5 "
                   "--condition region in '[\"eu\",\"us\"]' (VALUE is JSON when it parses).")
@click.option("--delta-property", default=None, help="Dot path of the amount (default: properties.delta, else 1).")
@click.option("--priority", type=int, default=None, help="Lower runs first; the first matching rule wins.")
@click.option("--reprocess", "then", type=click.Choice(["queue", "inline", "none"]), default="queue",
              show_default=True, help="Reprocess stored unmapped events: as an RQ job, here, or not now.")
@click.option("--json", "as_json", is_flag=True)
def rule_create(workspace_id: int, feature_id: str, event: str, kind: str | None,
                conditions: tuple[tuple[str, str, str], ...], delta_property: str | None, priority: int | None,
                then: str, as_json: bool) -> None:
    """Create a mapping rule, then reprocess the workspace's unmapped events."""
    from kana.services import rules

    data: dict = {"feature_id": feature_id, "event": event, "type": kind,
                  "conditions": [{"property": p, "operator": o, "value": rules.typed_value(v)}
                                 for p, o, v in conditions]}
    if delta_property is not None:
        data["delta_property"] = delta_property
    if priority is not None:
        data["priority"] = priority
    body = _not_queued(rules.create(_runtime() if then == "queue" else None, workspace_id, data), workspace_id)
    if then == "inline":
        body["reprocess"] = _reprocess_inline(workspace_id, 5000)
    if as_json:
        click.echo(json.dumps(body))
    else:
        click.echo(f"rule {body['id']} created"
                   + (f"; reprocessing job {body['job_id']}" if body.get("job_id") else "")
                   + (f"; mapped {body['reprocess']['mapped']} stored events" if "reprocess" in body else ""))


@rule.command("list")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--json", "as_json", is_flag=True)
def rule_list(workspace_id: int, as_json: bool) -> None:
    """List mapping rules in the order they are tried."""
    from kana.services import rules

    _session()
    rows = rules.listed(workspace_id)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        where = " AND ".join(f"{c['property']} {c['operator']} {json.dumps(c.get('value'))}" for c in r["conditions"])
        state = "" if r["enabled"] else " (disabled)"
        click.echo(f"{r['id']}\tp{r['priority']}\t{r['type'] or '*'}:{r['event']}\t→ {r['feature_id']}"
                   f"{' by ' + r['delta_property'] if r['delta_property'] else ''}"
                   f"{' if ' + where if where else ''}{state}")


@rule.command("delete")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("rule_id", type=int)
def rule_delete(workspace_id: int, rule_id: int) -> None:
    """Delete a rule (usage it already recorded stays in the ledger)."""
    from kana.services import rules

    _session()
    rules.delete(workspace_id, rule_id)
    click.echo(f"rule {rule_id} deleted")


@main.command("reprocess")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--async", "run_async", is_flag=True, help="Queue an RQ job instead of running here.")
@click.option("--chunk", type=click.IntRange(100, 100_000), default=5000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def reprocess_cmd(workspace_id: int, run_async: bool, chunk: int, as_json: bool) -> None:
    """Map the workspace's stored unmapped events with the current rules and features."""
    if run_async:
        from kana.services import rules

        job_id = rules.request_reprocess(_runtime(), workspace_id, "requested from the CLI")
        click.echo(json.dumps({"job_id": job_id}) if as_json else f"reprocessing job {job_id} queued")
        return
    result = _reprocess_inline(workspace_id, chunk)
    click.echo(json.dumps(result) if as_json else f"scanned {result['scanned']}, mapped {result['mapped']}")


# --- flags, CSV, billing imports, operator merges and deletes (SPEC §4.5, §5, §6, §8) ------------


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@main.group()
def flags() -> None:
    """Users without a billing id and users sharing an email."""


@flags.command("refresh")
@click.option("--workspace", "workspace_id", type=int, default=None, help="Only this workspace (default: all).")
def flags_refresh(workspace_id: int | None) -> None:
    """Rebuild the flag tables now and print the counts."""
    from kana.domain import flags as flag_tables

    sessions = _session()
    if workspace_id is None:
        _echo_json(flag_tables.refresh_all(sessions))
        return
    with sessions.begin() as s:
        _require_workspace(s, workspace_id)
        _echo_json(flag_tables.refresh(s, workspace_id))


@main.group("export")
def export_() -> None:
    """Export data."""


@export_.command("csv")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--flag", type=click.Choice(["missing_billing_id", "duplicate_email", "any"]), default=None,
              help="Only users with this flag at the last refresh.")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8", lazy=True), default="-",
              help="File to write (default: standard output).")
def export_csv(workspace_id: int, flag: str | None, output) -> None:  # noqa: ANN001
    """Write the workspace's users as CSV (kana_id,user_id,name,email,billing_id,created_at)."""
    from kana.imports import csvfile

    with _session()() as s:
        _require_workspace(s, workspace_id)
        for text in csvfile.export_lines(s, workspace_id, flag=flag):
            output.write(text)


@main.group("import")
def import_() -> None:
    """Import users from a CSV file or a billing provider."""


@import_.command("csv")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--report", "show_report", is_flag=True, help="Print the line-numbered report too.")
def import_csv(workspace_id: int, file: str, show_report: bool) -> None:
    """Import users from CSV (runs here; the same rules as the API's import job)."""
    from pathlib import Path

    from kana.imports import csvfile
    from kana.models import CsvImport

    path = Path(file)
    data = path.read_bytes()
    try:
        csvfile.parse(data)
    except csvfile.CsvError as exc:
        raise click.ClickException(f"{path.name}: {exc.message}") from None
    sessions = _session()
    with sessions.begin() as s:
        _require_workspace(s, workspace_id)
        import_id = csvfile.create_import(s, workspace_id, path.name).id
    with click.progressbar(length=1000, label=f"importing {path.name}", file=sys.stderr) as bar:
        state = {"shown": 0}

        def progress(done: int, total: int) -> None:
            target = int(1000 * done / total) if total else 1000
            bar.update(target - state["shown"])
            state["shown"] = target

        summary = csvfile.run_import(sessions, import_id, data, progress=progress, actor="cli")
    if show_report:
        with sessions() as s:
            imp = s.get(CsvImport, import_id)
            summary = csvfile.import_json(imp)
    _echo_json(summary)
    if summary["status"] == "failed":
        raise click.ClickException(summary["error"] or "import failed")


def _billing_import(workspace_id: int, provider: str) -> None:
    from kana.imports import customers

    counts = customers.run(_session(), workspace_id, provider, _settings(),
                           progress=lambda n: click.echo(f"{n} customers", err=True))
    _echo_json(counts)


@import_.command("stripe")
@click.option("--workspace", "workspace_id", type=int, required=True)
def import_stripe(workspace_id: int) -> None:
    """Upsert the workspace's Stripe customers as unclaimed users (key: workspace setting or STRIPE_API_KEY)."""
    _billing_import(workspace_id, "stripe")


@import_.command("chargebee")
@click.option("--workspace", "workspace_id", type=int, required=True)
def import_chargebee(workspace_id: int) -> None:
    """Upsert the workspace's Chargebee customers as unclaimed users."""
    _billing_import(workspace_id, "chargebee")


@main.group()
def users() -> None:
    """Operator actions on users (audited)."""


@users.command("merge")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("kana_ids", type=int, nargs=-1, required=True)
def users_merge(workspace_id: int, kana_ids: tuple[int, ...]) -> None:
    """Merge users into the one created first; prints the survivor."""
    from kana.services import users as user_actions

    if len(set(kana_ids)) < 2:
        raise click.ClickException("give at least two distinct kana_ids")
    _session()
    survivor = user_actions.merge(workspace_id, list(kana_ids), trigger="cli", actor="cli").user
    _echo_json({k: survivor[k] for k in ("kana_id", "user_id", "email", "name", "billing_id", "aliases")})


@users.command("delete")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("kana_ids", type=int, nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="Don't ask for confirmation.")
def users_delete(workspace_id: int, kana_ids: tuple[int, ...], yes: bool) -> None:
    """Delete users with their events and usage."""
    from kana.services import users as user_actions

    with _session()() as s:
        user_actions.selected(s, workspace_id, list(kana_ids))
    if not yes:
        click.confirm(f"Delete {len(set(kana_ids))} user(s) with their events and usage?", abort=True)
    deleted = user_actions.delete(workspace_id, list(kana_ids), trigger="cli", actor="cli")
    _echo_json({"deleted": deleted})


# --- dashboard admins (SPEC §8) -------------------------------------------------------------


@main.group()
def admin() -> None:
    """People who log in to the operator dashboard (each sees only their workspace)."""


@admin.command("create")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--email", required=True)
@click.option("--password", default=None,
              help="Prefer the prompt: a password given here stays in the shell history.")
@click.option("--operator", is_flag=True, default=False,
              help="An installation operator: may also open /rq, which shows every workspace's jobs.")
def admin_create(workspace_id: int, email: str, password: str | None, operator: bool) -> None:
    """Create a dashboard admin of a workspace (prompts for the password unless given)."""
    from kana.domain import accounts

    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _session().begin() as s:
        row = accounts.create_admin(s, workspace_id, email, password, operator=operator)
        admin_id, address = row.id, row.email
    role = "installation operator" if operator else "dashboard admin"
    click.echo(f"{role} {admin_id} ({address}) created for workspace {workspace_id}")


@admin.command("password")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--email", required=True)
@click.option("--password", default=None, help="Prefer the prompt (see admin create).")
def admin_password(workspace_id: int, email: str, password: str | None) -> None:
    """Set a dashboard admin's password (ends every session they have open)."""
    from sqlalchemy import select

    from kana.domain import accounts
    from kana.models import DashboardAdmin

    if password is None:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    with _session().begin() as s:
        row = s.scalar(select(DashboardAdmin).where(DashboardAdmin.workspace_id == workspace_id,
                                                    DashboardAdmin.email == accounts.normal_email(email)))
        if row is None:
            raise click.ClickException(f"no dashboard admin {email} in workspace {workspace_id}")
        accounts.set_password(s, row, password)
    click.echo(f"password of {accounts.normal_email(email)} changed")


@admin.command("logout")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--email", required=True)
def admin_logout(workspace_id: int, email: str) -> None:
    """End every dashboard session of an admin (as their "Log out everywhere" does)."""
    from sqlalchemy import select

    from kana.domain import accounts
    from kana.models import DashboardAdmin

    with _session().begin() as s:
        row = s.scalar(select(DashboardAdmin).where(DashboardAdmin.workspace_id == workspace_id,
                                                    DashboardAdmin.email == accounts.normal_email(email)))
        if row is None:
            raise click.ClickException(f"no dashboard admin {email} in workspace {workspace_id}")
        ended = accounts.end_sessions(s, row.id)
    click.echo(f"{ended} session(s) of {accounts.normal_email(email)} ended")


@admin.command("list")
@click.option("--workspace", "workspace_id", type=int, required=True)
def admin_list(workspace_id: int) -> None:
    """List a workspace's dashboard admins."""
    from sqlalchemy import select

    from kana.models import DashboardAdmin

    with _session()() as s:
        rows = s.scalars(select(DashboardAdmin).where(DashboardAdmin.workspace_id == workspace_id)
                         .order_by(DashboardAdmin.id))
        for row in rows:
            last = row.last_login_at.isoformat() if row.last_login_at else "never"
            role = "\toperator" if row.operator else ""
            click.echo(f"{row.id}\t{row.email}\tlast login {last}{role}")


from kana.cli import plans as _plans  # noqa: E402,F401 - registers `kana plan …` and `kana webhook set`
