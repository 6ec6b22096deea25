"""Service settings: read once from the environment at the edge (the CLI or the ASGI factory) and passed in."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from moviematch_ml.errors import ConfigError, MissingExtraError

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
Scope = Literal["predict", "feedback", "metrics", "admin"]
SCOPES: Final[frozenset[str]] = frozenset(get_args(Scope))
# Shorter secrets are refused: a key that can be guessed protects nothing.
MIN_SECRET_LENGTH: Final[int] = 16
_WINDOWS: Final[dict[str, float]] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


def parse_api_keys(text: str | None) -> list[tuple[bytes, frozenset[str]]]:
    """``API_KEYS`` (comma-separated ``secret:scope+scope``) as (sha256 of the secret, scopes); ConfigError naming
    the entry's position and the rule it breaks, never its secret."""
    keys: dict[bytes, frozenset[str]] = {}
    for n, entry in enumerate((text or "").split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        secret, sep, scopes_text = entry.rpartition(":")
        if not sep or not secret:
            raise ConfigError(f"API_KEYS entry {n}: must be secret:scope+scope")
        if len(secret) < MIN_SECRET_LENGTH or not secret.isprintable() or " " in secret:
            raise ConfigError(
                f"API_KEYS entry {n}: the secret must be at least {MIN_SECRET_LENGTH} printable characters, "
                "without spaces"
            )
        scopes = frozenset(s.strip() for s in scopes_text.split("+") if s.strip())
        unknown = scopes - SCOPES
        if not scopes or unknown:
            raise ConfigError(
                f"API_KEYS entry {n}: scopes must be among {sorted(SCOPES)} (got {sorted(unknown) or 'none'})"
            )
        digest = hashlib.sha256(secret.encode()).digest()
        if digest in keys:
            raise ConfigError(f"API_KEYS entry {n}: the same secret twice")
        keys[digest] = scopes
    return list(keys.items())


def parse_weights(text: str | None) -> dict[str, float]:
    """``VARIANT_WEIGHTS`` (comma-separated ``name=weight``) as a dict; ConfigError naming the entry and the rule."""
    weights: dict[str, float] = {}
    for n, entry in enumerate((text or "").split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or not 0.0 <= weight < 1.0:
            raise ConfigError(f"VARIANT_WEIGHTS entry {n}: must be name=weight with 0 <= weight < 1 (got {entry!r})")
        weights[name.strip()] = weight
    if sum(weights.values()) >= 1.0:
        raise ConfigError("VARIANT_WEIGHTS: the weights must add up to less than 1 (the champion keeps the rest)")
    return weights


def parse_rate(text: str | None) -> tuple[int, float] | None:
    """``RATE_LIMIT`` (``N/second``, ``N/minute`` or ``N/hour``) as (requests, window seconds); None when unset."""
    if not text:
        return None
    count, sep, unit = text.strip().partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1 or unit.strip() not in _WINDOWS:
        raise ConfigError(f"RATE_LIMIT must be N/second, N/minute or N/hour with N >= 1 (got {text!r})")
    return int(count), _WINDOWS[unit.strip()]


# No keyword overrides: every field comes from the environment. (Spelt as ** so that mypy accepts the call with or
# without the pydantic plugin, which is what tells it the fields have defaults.) Here, not in api.app, so that the
# serve command's supervisor reads its settings without importing the web app (a second of start-up).
ENV_ONLY: Final[dict[str, Any]] = {}


class Settings(BaseSettings):
    """Every knob of the service. Environment variables use the upper-case field name (``MODEL_PATH``...)."""

    # hide_input_in_errors: pydantic's messages would repeat a refused value, and API_KEYS holds secrets.
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, protected_namespaces=("settings_",), hide_input_in_errors=True
    )

    host: str = Field("0.0.0.0", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port (Railway sets PORT).")
    workers: int = Field(1, ge=1, le=64, description="Server worker processes.")
    model_path: Path | None = Field(
        None, description="Model directory or model_card.json; unset means the model bundled in the package."
    )
    serve_noncommercial_models: bool = Field(
        True,
        description="Serve models trained on data whose terms forbid commercial use without permission (the bundled "
        "models: MovieLens). false for a commercial deployment: such models are refused, and the fallback rule and "
        "models trained on your own data answer (docs/training.md#data-and-terms).",
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
    movie_id_space: str = Field(
        "app",
        pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="Whose movie ids the app's requests and feedback use ('app': its own, e.g. TMDB's). A "
        "personalised model whose card declares another space (the bundled one: 'movielens') serves without its "
        "movie-side learned state: only the users' own feedback and the store's movie statistics reach it.",
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

    # --- access -----------------------------------------------------------------------------------------------
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated secret:scope+scope entries (scopes: predict, feedback, metrics, admin). When set, "
        "every endpoint but the health probes needs a key (Authorization: Bearer); unset: open, except admin.",
    )
    rate_limit: str | None = Field(
        None,
        description="Most requests per key: N/second, N/minute or N/hour (shared by replicas through REDIS_URL).",
    )

    # --- overload and timeouts ----------------------------------------------------------------------------------
    max_concurrency: int = Field(
        # Small, because a worker runs its started requests one after the other: the last waits for all the others,
        # and so does a health probe that arrives meanwhile (docs/operations.md, Overload, has the measurements).
        64,
        ge=1,
        le=100_000,
        description="Requests a worker handles at once; past it, 503 with Retry-After.",
    )
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds a client has to send a request's headers; then it is disconnected."
    )
    body_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds a client has to send a request's body; then its connection is closed."
    )
    store_read_timeout: float = Field(
        0.5,
        gt=0,
        le=60,
        description="Seconds a prediction waits for a user's ratings from the store; then the six-feature model "
        "answers.",
    )
    store_write_timeout: float = Field(
        10.0, gt=0, le=600, description="Seconds /feedback waits for the store's commit; then 503 (retry with the key)."
    )
    store_connect_timeout: float = Field(
        3.0, gt=0, le=600, description="Seconds to connect to PostgreSQL (and to wait for a pooled connection)."
    )
    store_statement_timeout: float = Field(
        5.0, gt=0, le=3600, description="PostgreSQL statement_timeout: the longest a query may run (seconds)."
    )
    redis_timeout: float = Field(
        0.05, gt=0, le=10, description="Seconds a Redis call may take; failures open a circuit breaker for 5 s."
    )

    # --- models: registry, A/B variants, reloads, the prediction log ---------------------------------------------
    model_registry: Path | None = Field(
        None,
        description="A model registry directory (moviematch-ml models ...): its champion answers, its challengers "
        "answer their share of users; it overrides MODEL_PATH once it has a champion.",
    )
    variant_weights: str | None = Field(
        None, description="Overrides of the challengers' weights: comma-separated name=weight (0 <= weight < 1)."
    )
    experiment_salt: str | None = Field(
        None, description="Overrides the registry's salt: which users each variant gets (change it to reshuffle)."
    )
    registry_poll_seconds: float = Field(
        5.0, ge=0, le=3600, description="How often a worker checks the registry file for a change (0: never)."
    )
    prediction_log: bool = Field(
        True, description="Write every prediction served to the store's prediction_log (off the request path)."
    )
    prediction_log_queue: int = Field(
        100_000, ge=1, le=10_000_000, description="Most predictions a worker queues for the log; past it, dropped."
    )
    prediction_log_share: float = Field(
        0.05, gt=0, le=1, description="Most of a worker's time spent writing the prediction log; past it, dropped."
    )
    prediction_log_retention_days: float = Field(
        90.0, ge=0, le=36_500, description="Prediction-log rows older than this are deleted (hourly); 0: kept."
    )

    # --- health and shutdown ------------------------------------------------------------------------------------
    require_model: bool = Field(
        False, description="/health/ready is 503 while the trained model is not loaded (the fallback rule answers)."
    )
    drain_seconds: float = Field(
        3.0,
        ge=0,
        le=600,
        description="After SIGTERM, seconds /health/ready answers 503 while requests are still served, before the "
        "listener closes (so a load balancer stops sending new ones).",
    )

    railway_environment_id: str | None = Field(
        None, description="Set by Railway: the service runs there (its containers' disks do not outlive a redeploy)."
    )

    @property
    def ephemeral_store(self) -> bool:
        """On Railway without DATABASE_URL: the default SQLite file lives in the container and a redeploy loses it."""
        return self.railway_environment_id is not None and "database_url" not in self.model_fields_set

    @field_validator("api_keys")
    @classmethod
    def _keys_parse(cls, value: SecretStr | None) -> SecretStr | None:
        try:
            parse_api_keys(None if value is None else value.get_secret_value())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("variant_weights")
    @classmethod
    def _weights_parse(cls, value: str | None) -> str | None:
        try:
            parse_weights(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_parses(cls, value: str | None) -> str | None:
        try:
            parse_rate(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

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
            # Browsers reject "Access-Control-Allow-Origin: *" on credentialed requests: allow_origins=["*"] with
            # allow_credentials=True never works, so it is refused here, loudly.
            raise ValueError("CORS_ALLOW_CREDENTIALS cannot be true when CORS_ORIGINS contains '*'")
        return value


def load_settings() -> Settings:
    """The settings from the environment; ConfigError naming each invalid variable and its rule. The values are
    not repeated: a setting such as API_KEYS holds secrets, and this message ends up in logs."""
    try:
        return Settings(**ENV_ONLY)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'settings'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid settings: {problems}") from None


POSTGRES_SCHEMES: Final[tuple[str, ...]] = ("postgres://", "postgresql://", "postgresql+psycopg://")


def require_drivers(settings: Settings) -> None:
    """Raise MissingExtraError when a setting needs a driver this install lacks (the default install has none:
    they are the ``[postgres]`` and ``[redis]`` extras). Checked before serving, so the error comes first."""
    if settings.database_url.startswith(POSTGRES_SCHEMES):
        MissingExtraError.require("psycopg", extra="postgres", setting="DATABASE_URL=postgresql://...")
    if settings.prediction_cache_backend == "redis":
        MissingExtraError.require("redis", extra="redis", setting="PREDICTION_CACHE_BACKEND=redis")
    if settings.rate_limit and settings.api_keys is not None and settings.redis_url:
        MissingExtraError.require("redis", extra="redis", setting="RATE_LIMIT with REDIS_URL")
