"""prediction_log: every prediction served, one row per request (what ab-report and train --from-feedback read).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("logged_at", sa.Float(), nullable=False),
        sa.Column("endpoint", sa.String(16), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("movie_ids", sa.Text(), nullable=False),
        sa.Column("features", sa.LargeBinary(), nullable=False),
        sa.Column("predictions", sa.LargeBinary(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("row_sources", sa.Text(), nullable=True),
        sa.Column("ranked", sa.Boolean(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=True),
    )
    op.create_index("ix_prediction_log_request_id", "prediction_log", ["request_id"])
    op.create_index("ix_prediction_log_user_id", "prediction_log", ["user_id", "logged_at"])
    op.create_index("ix_prediction_log_logged_at", "prediction_log", ["logged_at"])


def downgrade() -> None:
    op.drop_table("prediction_log")
