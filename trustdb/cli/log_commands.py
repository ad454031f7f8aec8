"""CLI verbs (placeholder: filled in by its issue)."""

from trustdb.cli import app  # noqa: F401
