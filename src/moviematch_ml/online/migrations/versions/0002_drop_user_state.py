"""Drop user_state: running per-user totals that nothing reads (a user's state is built from their ratings).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("user_state")


def downgrade() -> None:
    op.create_table(
        "user_state",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("rating_sum", sa.Float(), nullable=False),
        sa.Column("rating_sumsq", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
