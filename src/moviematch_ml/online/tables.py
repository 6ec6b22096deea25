"""The feedback store's schema: its tables, as the migrations create them (a test checks both agree)."""

from __future__ import annotations

from typing import Final

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text

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


# Every prediction served, one row per request (a batch's rows packed as arrays: one INSERT per request rather than
# one per movie). Prediction ids: /predict's is ``request_id``; row i of a batch is ``<request_id>-<i>``.
# ``features`` is float64 little-endian, n x 6 in FEATURE_NAMES order; ``predictions`` float64, the n answers (0-10)
# in request order; ``source`` the one source of every row, or "mixed" with ``row_sources`` a JSON list.
prediction_log_table = Table(
    "prediction_log",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False),
    Column("logged_at", Float, nullable=False),
    Column("endpoint", String(16), nullable=False),
    Column("variant", String(64), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("user_id", String(128), nullable=True),
    Column("n", Integer, nullable=False),
    Column("movie_ids", Text, nullable=False),
    Column("features", LargeBinary, nullable=False),
    Column("predictions", LargeBinary, nullable=False),
    Column("source", String(16), nullable=False),
    Column("row_sources", Text, nullable=True),
    Column("ranked", Boolean, nullable=False),
    Column("top_k", Integer, nullable=True),
    Index("ix_prediction_log_request_id", "request_id"),
    Index("ix_prediction_log_user_id", "user_id", "logged_at"),
    Index("ix_prediction_log_logged_at", "logged_at"),
)
# The columns a prediction-log row is written with (all but ``id``), in the order of ``PredictionLog.rows``' values.
PREDICTION_LOG_COLUMNS: Final[tuple[str, ...]] = tuple(c.name for c in prediction_log_table.columns if c.name != "id")
