"""Alembic environment: always handed a live connection by ``moviematch_ml.online.migrations.upgrade``."""

from __future__ import annotations

from alembic import context

from moviematch_ml.online.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through moviematch_ml.online.migrations.upgrade(engine)")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
