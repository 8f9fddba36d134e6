"""Alembic's entry point: the store hands over its connection, already in the transaction that holds the lock."""

from __future__ import annotations

from alembic import context

from edgemed.dashboard.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
