"""Service settings: read once from the environment at the edge (the CLI or the ASGI factory) and passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


# No keyword overrides: every field comes from the environment. (Spelt as ** so that mypy accepts the call with or
# without the pydantic plugin, which is what tells it the fields have defaults.) Here, not in api.app, so that the
# serve command's supervisor reads its settings without importing the web app (a second of start-up).
ENV_ONLY: Final[dict[str, Any]] = {}


class Settings(BaseSettings):
    """Every knob of the service. Environment variables use the upper-case field name (``MODEL_PATH``...)."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, protected_namespaces=("settings_",))

    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port (Railway sets PORT).")
    workers: int = Field(1, ge=1, le=64, description="Server worker processes.")
    model_path: Path | None = Field(
        None, description="Model directory or model_card.json; unset means the model bundled in the package."
    )
    log_level: LogLevel = Field("info", description="Minimum level of the JSON log lines.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS; '*' allows any origin, without credentials.",
    )
    cors_allow_credentials: bool = Field(
        False, description="Send Access-Control-Allow-Credentials; refused together with '*'."
    )
    max_batch_size: int = Field(10_000, ge=1, le=1_000_000, description="Most movies in one /predict-batch.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted (bytes).")
    graceful_timeout: float = Field(30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM.")
    database_url: str = Field(
        "sqlite:///moviematch.sqlite3",
        description="Feedback store: SQLite file by default, postgresql://... for PostgreSQL.",
    )
    state_ttl_seconds: float = Field(
        1.0,
        ge=0,
        description="How often a replica reads the store's change feed: another replica's new rating of a user shows "
        "in this replica's predictions within this many seconds (0: read the user's ratings on every request).",
    )
    state_cache_users: int = Field(
        20_000,
        ge=0,
        description="Most users whose state a worker keeps in memory (about 0.6-0.7 KB each); others are read again.",
    )
    state_warm_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of a worker's time it may spend building, before they ask, the state of users the change "
        "feed names (new ratings, from any replica); 0: off, their next request reads their ratings instead.",
    )
    redis_url: str | None = Field(
        None, description="Redis, for PREDICTION_CACHE_BACKEND=redis (the answer cache shared by replicas)."
    )
    fast_path: bool = Field(
        True,
        description="Serve POST /predict and /predict-batch by the pure-ASGI fast path (false: through FastAPI).",
    )
    fastapi_telemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry instrumentation. Off: with no OpenTelemetry provider set up "
        "it records nothing yet costs microseconds per request (docs/performance.md); turn on with a provider.",
    )
    prediction_cache_size: int = Field(
        10_000,
        ge=0,
        le=1_000_000,
        description="Entries of the in-process answer cache keyed on model version + request body (0: off); "
        "at most 32 MB, bodies up to 16 KB, personalised answers never cached. See docs/performance.md.",
    )

    metrics_enabled: bool = Field(
        True,
        description="Count requests, predictions, drift and calls, and serve them at GET /metrics (Prometheus text "
        "format); false: no /metrics and nothing counted.",
    )
    metrics_drift_share: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Most of a busy worker's time counting inputs for drift: requests are skipped for a while after "
        "each counted one (a sample by time, unbiased); 1: count every input.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Directory where each worker process keeps its metric values, so that a scrape of any worker "
        "shows all of them; `moviematch-ml serve` with several workers makes a temporary one when unset, and empties "
        "it at start.",
    )

    prediction_cache_backend: Literal["memory", "redis"] = Field(
        "memory",
        description="Where answers are cached: in each process, or in Redis (REDIS_URL) shared by all replicas; "
        "memory is faster (see docs/performance.md).",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("prediction_cache_backend")
    @classmethod
    def _redis_needs_url(cls, value: str, info: object) -> str:
        if value == "redis" and not getattr(info, "data", {}).get("redis_url"):
            raise ValueError("PREDICTION_CACHE_BACKEND=redis needs REDIS_URL")
        return value

    @field_validator("cors_allow_credentials")
    @classmethod
    def _no_credentials_with_wildcard(cls, value: bool, info: object) -> bool:
        data = getattr(info, "data", {})
        if value and "*" in data.get("cors_origins", []):
            # Browsers reject "Access-Control-Allow-Origin: *" on credentialed requests: the design document's
            # allow_origins=["*"] with allow_credentials=True never worked, so it is refused here, loudly.
            raise ValueError("CORS_ALLOW_CREDENTIALS cannot be true when CORS_ORIGINS contains '*'")
        return value
