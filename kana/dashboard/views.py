"""Imports the modules whose routes make up the dashboard blueprint."""

from kana.dashboard import common, login, mapping, ops, overview, plans, users  # noqa: F401
