"""``kana plan …`` and ``kana webhook set`` (SPEC §11), registered on the ``kana`` group."""

from __future__ import annotations

import json

import click

from kana.cli.base import _require_workspace, _runtime, _session, main


@main.group()
def plan() -> None:
    """Plans: bundles of feature entitlements (limits, periods, alert thresholds)."""


@plan.command("create")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("plan_id")
@click.option("--name", default=None)
@click.option("--features", "features_json", default="[]", show_default=True,
              help='JSON list: [{"feature_id", "limit"?, "period"?, "overage"?, "thresholds"?}]')
@click.option("--json", "as_json", is_flag=True)
def plan_create(workspace_id: int, plan_id: str, name: str | None, features_json: str, as_json: bool) -> None:
    """Create a plan."""
    from kana.services import plans

    try:
        items = json.loads(features_json)
    except ValueError as exc:
        raise click.ClickException(f"--features is not JSON: {exc}") from None
    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    body = plans.create(workspace_id, {"id": plan_id, "name": name or plan_id, "features": items})
    click.echo(json.dumps(body) if as_json else f"plan {body['id']} created with {len(body['features'])} features")


@plan.command("list")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--json", "as_json", is_flag=True)
def plan_list(workspace_id: int, as_json: bool) -> None:
    """List plans and their features."""
    from kana.services import plans

    _session()  # the engine, configured
    rows = plans.listed(workspace_id)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        parts = [f"{f['feature_id']}" + ("" if f["type"] == "binary" else
                                         f"={'unlimited' if f['limit'] is None else f['limit']}/{f['period']}")
                 for f in row["features"]]
        click.echo(f"{row['id']}\t{row['name']}\t{' '.join(parts)}")


@plan.command("assign")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.option("--user", "user_id", default=None, help="The user's id (aliases resolve).")
@click.option("--kana-id", "kana_id", type=int, default=None)
@click.argument("plan_id", required=False)
@click.option("--none", "remove", is_flag=True, help="Take the user off any plan.")
def plan_assign(workspace_id: int, user_id: str | None, kana_id: int | None, plan_id: str | None,
                remove: bool) -> None:
    """Put a user on a plan (or off it with --none)."""
    from kana.domain import identity
    from kana.services import plans

    if (user_id is None) == (kana_id is None):
        raise click.UsageError("give exactly one of --user or --kana-id")
    if (plan_id is None) != remove:
        raise click.UsageError("give a PLAN_ID, or --none")
    with _session().begin() as s:
        _require_workspace(s, workspace_id)
        if user_id is not None:
            found = identity.find_user(s, workspace_id, user_id)
            if found is None:
                raise click.ClickException(f"no user {user_id!r} in workspace {workspace_id}")
            kana_id = found.kana_id
    plans.assign(workspace_id, kana_id, plan_id)  # type: ignore[arg-type]
    click.echo(f"user {kana_id} is on plan {plan_id}" if plan_id else f"user {kana_id} has no plan")


@main.group()
def webhook() -> None:
    """The workspace's webhook (usage.threshold_crossed alerts)."""


@webhook.command("set")
@click.option("--workspace", "workspace_id", type=int, required=True)
@click.argument("url")
@click.option("--json", "as_json", is_flag=True)
def webhook_set(workspace_id: int, url: str, as_json: bool) -> None:
    """Set the webhook URL; prints a new signing secret (shown once)."""
    from kana.services import webhooks

    runtime = _runtime()
    with _session().begin() as s:
        _require_workspace(s, workspace_id)
    body = webhooks.set_url(runtime, workspace_id, url)
    click.echo(json.dumps(body) if as_json else f"webhook {body['url']}\nsecret {body['secret']}")
