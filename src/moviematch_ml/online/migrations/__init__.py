"""Alembic migrations of the feedback store, run programmatically at start-up (``upgrade``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from alembic.config import Config

_HERE = Path(__file__).parent
# Any constant works: it only has to be the same number in every replica.
_PG_LOCK_KEY = 0x6D6D6C
# The newest revision in versions/ (a test holds it to Alembic's own head). A store already there needs nothing
# from Alembic: every worker of every start checks the schema, and importing Alembic (with Mako and Pygments)
# would cost each of them memory and start-up time for nothing.
HEAD_REVISION: Final[str] = "0003"


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    return cfg


def current_revision(engine: Engine) -> str | None:
    """The store's Alembic revision, or None when it has none yet (a new database)."""
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except SQLAlchemyError:
        return None  # no alembic_version table: Alembic creates it
    return None if row is None else str(row[0])


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema; on PostgreSQL an advisory lock makes concurrent replicas take turns."""
    if revision == "head" and current_revision(engine) == HEAD_REVISION:
        return
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
