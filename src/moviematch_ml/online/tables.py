"""The feedback store's schema: its tables, as the migrations create them (a test checks both agree)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table

metadata = MetaData()

feedback_table = Table(
    "feedback",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("feedback_id", String(64), nullable=False, unique=True),
    Column("user_id", String(128), nullable=False),
    Column("movie_id", String(128), nullable=False),
    Column("rating", Float, nullable=False),
    Column("rated_at", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("prediction_id", String(128), nullable=True),
    Index("ix_feedback_user_id", "user_id", "id"),
    Index("ix_feedback_movie_id", "movie_id"),
)


# Running totals of the ratings (0-10) each movie received: what the personalised model's movie inputs add to
# the trained moments.
movie_state_table = Table(
    "movie_state",
    metadata,
    Column("movie_id", String(128), primary_key=True),
    Column("n", Integer, nullable=False),
    Column("rating_sum", Float, nullable=False),
    Column("rating_sumsq", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
