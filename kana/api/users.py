"""Users (SPEC §4, §10): list and find, create, get, merge, delete."""

from __future__ import annotations

from typing import Any

from flask import jsonify, url_for
from flask.typing import ResponseReturnValue
from marshmallow import Schema, ValidationError, fields, validate
from sqlalchemy import false, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kana import auth
from kana.api.common import PageQuery, StrictSchema, body, bp, doc, no_nul, page, query, text
from kana.db import SessionLocal
from kana.domain import flags, identity
from kana.domain.billing import check_billing_id, provider_of
from kana.domain.ids import MAX_ID, in_id_range, user_id_problem
from kana.errors import Conflict, NotFound, field_error, invalid
from kana.models import User, Workspace
from kana.serializers import UserDetail, UserOut, user_json
from kana.services import users as user_actions

MAX_MERGE = 1000


def _user_id_field(value: str) -> None:
    if value and user_id_problem(value) is not None:
        raise ValidationError("Must be a real user id, not blank or a placeholder like 'null' or 'undefined'.")


class UserListQuery(PageQuery):
    user_id = text(metadata={"description": "exact user_id, or an alias of the user"})
    email = text(metadata={"description": "case-insensitive email"})
    q = text(max_length=200, metadata={"description": "substring of user_id, email or name"})
    flag = fields.String(
        load_default=None,
        validate=validate.OneOf((*flags.FLAGS, flags.ANY)),
        metadata={"description": "users flagged at the last flag refresh (GET /api/v1/flags)"},
    )


class UserCreate(StrictSchema):
    user_id = text(max_length=1000)
    email = fields.Email(load_default=None, allow_none=True, validate=[no_nul, validate.Length(max=320)])
    name = text(max_length=1000)
    billing_id = text(max_length=100)


class MergeRequest(StrictSchema):
    kana_ids = fields.List(
        fields.Integer(strict=True, validate=validate.Range(1, MAX_ID)), required=True,
        validate=validate.Length(min=2, max=MAX_MERGE),
    )


class UserPage(Schema):
    users = fields.List(fields.Nested(UserOut), required=True)
    next_cursor = fields.String(allow_none=True, required=True)


def user_or_404(session: Session, workspace_id: int, kana_id: int) -> User:
    user = None
    if in_id_range(kana_id):
        user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        raise NotFound(f"No user with kana_id {kana_id} in this workspace.")
    return user


def _user_filters(session: Session, workspace_id: int, args: dict[str, Any]) -> list[Any]:
    conditions: list[Any] = [User.workspace_id == workspace_id]
    if args["user_id"] is not None:
        found = identity.find_user(session, workspace_id, args["user_id"])
        conditions.append(User.kana_id == found.kana_id if found is not None else false())
    if args["email"] is not None:
        conditions.append(User.email_key == identity.email_key(args["email"]))
    if args["q"]:
        needle = args["q"].strip().lower()
        conditions.append(or_(
            func.lower(User.user_id).contains(needle, autoescape=True),
            User.email_key.contains(needle, autoescape=True),
            func.lower(User.name).contains(needle, autoescape=True),
        ))
    if args["flag"] is not None:
        # The refreshed flag set, so the list matches the counts GET /flags reports.
        conditions.append(User.kana_id.in_(flags.flagged_user_ids_query(workspace_id, args["flag"])))
    return conditions


@bp.get("/users")
@doc("listUsers", "List or find users (keyset-paginated by kana_id)", query=UserListQuery, response=UserPage)
def list_users() -> ResponseReturnValue:
    args = query(UserListQuery)
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        stmt = select(User).where(*_user_filters(s, ws, args))
        users, cursor = page(s, stmt, User.kana_id, args)
        result = {"users": [user_json(u) for u in users], "next_cursor": cursor}
    return jsonify(result)


@bp.post("/users")
@doc("createUser", "Create a user (source api), claimed or unclaimed", body=UserCreate, status=201,
     response=UserDetail)
def create_user() -> ResponseReturnValue:
    data = body(UserCreate)
    if data["user_id"] is not None:
        try:
            _user_id_field(data["user_id"])
        except ValidationError as exc:
            raise invalid({"user_id": exc.messages}) from None
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        workspace = s.get(Workspace, ws)
        billing_id = data["billing_id"] or None
        provider = None
        if billing_id is not None:
            why = check_billing_id(billing_id, workspace.billing_provider)
            if why:
                raise field_error("billing_id", why[0].upper() + why[1:] + ".")
            provider = provider_of(billing_id, workspace.billing_provider)
        try:
            user = identity.create_user(
                s, ws, user_id=data["user_id"] or None, email=data["email"], name=data["name"],
                billing_id=billing_id, billing_provider=provider, source="api",
            )
        except identity.Conflict as exc:
            raise Conflict(str(exc), {"user_id": [str(exc)]}) from None
        except IntegrityError:
            # The same user_id created concurrently: the unique constraint caught it.
            raise Conflict(f"user_id {data['user_id']!r} is already in use in this workspace",
                           {"user_id": ["Already in use."]}) from None
        result = user_json(user, aliases=[])
    return jsonify(result), 201, {"Location": url_for("api.get_user", kana_id=result["kana_id"])}


@bp.get("/users/<id:kana_id>")
@doc("getUser", "A user with its aliases", response=UserDetail)
def get_user(kana_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        user = user_or_404(s, ws, kana_id)
        result = user_json(user, identity.aliases_of(s, ws, kana_id))
    return jsonify(result)


@bp.post("/users/merge")
@doc("mergeUsers", "Merge users into the one created first", body=MergeRequest, response=UserDetail)
def merge_users() -> ResponseReturnValue:
    data = body(MergeRequest)
    merged = user_actions.merge(auth.workspace_id(), data["kana_ids"], trigger="api", actor=auth.actor())
    return jsonify(merged.user)


@bp.delete("/users/<id:kana_id>")
@doc("deleteUser", "Delete a user with its events, usage and aliases", status=204)
def delete_user(kana_id: int) -> ResponseReturnValue:
    user_actions.delete(auth.workspace_id(), [kana_id], trigger="api", actor=auth.actor())
    return "", 204
