"""Feedback ratings and per-user / per-movie totals.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("feedback_id", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("movie_id", sa.String(128), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("rated_at", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("prediction_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_feedback_user_id", "feedback", ["user_id", "id"])
    op.create_index("ix_feedback_movie_id", "feedback", ["movie_id"])
    for name, key in (("user_state", "user_id"), ("movie_state", "movie_id")):
        op.create_table(
            name,
            sa.Column(key, sa.String(128), primary_key=True),
            sa.Column("n", sa.Integer(), nullable=False),
            sa.Column("rating_sum", sa.Float(), nullable=False),
            sa.Column("rating_sumsq", sa.Float(), nullable=False),
            sa.Column("updated_at", sa.Float(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("movie_state")
    op.drop_table("user_state")
    op.drop_index("ix_feedback_movie_id", "feedback")
    op.drop_index("ix_feedback_user_id", "feedback")
    op.drop_table("feedback")
