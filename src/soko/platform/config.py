"""Settings, read from ``SOKO_*`` environment variables or a ``.env`` file.

Every value is validated when the process starts; a bad value stops the start with one
clear line per problem (see :func:`load_settings`). Secrets that are not configured are
generated on first start and kept in the data directory with mode 0600, which is right
for a laptop and refused in production.
"""

from __future__ import annotations

import json
import secrets
import stat
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from soko.platform.files import publish_once

# The tokens' issuer while SOKO_PUBLIC_URL is not set (development).
DEFAULT_TOKEN_ISSUER = "soko"

# The longest wait a payment provider's Retry-After may impose between two attempts of
# one call (beyond it the call fails, retryable, and the job's own schedule takes over).
PROVIDER_RETRY_AFTER_MAX_SECONDS = 5.0


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


class Backend(StrEnum):
    """Where a shared concern (cache, rate limits, pub/sub) keeps its state."""

    memory = "memory"
    redis = "redis"


class OutboxDispatch(StrEnum):
    """Who runs outbox jobs: the API process itself, or separate `soko worker` processes."""

    inprocess = "inprocess"
    worker = "worker"


class ReservationStrategy(StrEnum):
    """How checkout claims stock: one conditional UPDATE per batch (optimistic), or row
    locks taken in a fixed order first (pessimistic; an immediate transaction on SQLite)."""

    optimistic = "optimistic"
    pessimistic = "pessimistic"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


class ConfigError(Exception):
    """Raised when the configuration cannot be used; its lines are meant for a human."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


GENERATED_SECRETS_FILE = "secrets.json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SOKO_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    env: Environment = Environment.development
    data_dir: Path = Path("var")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=256, description="API processes started by `soko serve`")
    # The address clients reach this API at (links to it, webhook and callback URLs,
    # the tokens' issuer). Empty: http://<host>:<port>, which is right on a laptop only.
    public_url: str = ""
    # The marketplace's own app or site, where links in emails and SMS lead
    # (<app_url>/verify-email?token=..., /reset-password?token=..., /store-invitations,
    # /orders/<id>). Empty: Soko's own plain pages at SOKO_PUBLIC_URL.
    app_url: str = ""
    _public_url_derived: bool = PrivateAttr(False)

    database_url: str = ""
    # All kept open once opened, none beyond: an overflow connection is closed as soon
    # as it is returned, so a pool that overflows under a steady load keeps starting
    # PostgreSQL backends and preparing its statements on them anew.
    database_pool_size: int = Field(20, ge=1, le=500)
    database_max_overflow: int = Field(0, ge=0, le=500)
    database_statement_cache: bool = True
    database_echo: bool = False
    # PostgreSQL ends a statement that runs longer (the request answers 503, a job is
    # tried again), and a session left idle inside a transaction longer (its locks
    # released): a query gone wrong or a stuck process cannot hold a connection or rows
    # for ever. 0 leaves the server's own setting. The idle limit must stay above the
    # longest wait for an outbound call inside a job's transaction (checked below).
    database_statement_timeout_seconds: float = Field(30.0, ge=0, le=86400)
    database_idle_in_transaction_timeout_seconds: float = Field(300.0, ge=0, le=86400)

    redis_url: str = ""
    # Per process and per pool (the shared client, the rate limiter's own): a request
    # beyond it waits for a connection instead of failing.
    redis_max_connections: int = Field(64, ge=2, le=10_000)
    cache_backend: Backend = Backend.memory
    ratelimit_backend: Backend = Backend.memory
    pubsub_backend: Backend = Backend.memory

    secret_key: SecretStr = SecretStr("")

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    gzip_min_bytes: int = Field(1024, ge=0)
    gzip_level: int = Field(6, ge=1, le=9)
    # Requests one API process works on at once (0: no limit); the next wait their turn,
    # and are answered 503 after request_queue_seconds (soko.platform.admission).
    request_concurrency: int = Field(8, ge=0, le=10_000)
    request_queue_seconds: float = Field(10.0, gt=0, le=300)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ratelimit_default: str = "600/minute"
    ratelimit_enabled: bool = True

    outbox_dispatch: OutboxDispatch = OutboxDispatch.inprocess
    outbox_poll_seconds: float = Field(1.0, gt=0, le=60)
    outbox_batch_size: int = Field(20, ge=1, le=1000)
    outbox_lease_seconds: float = Field(60.0, ge=1)
    outbox_max_attempts: int = Field(10, ge=1, le=100)
    outbox_backoff_base_seconds: float = Field(2.0, gt=0)
    outbox_backoff_max_seconds: float = Field(3600.0, gt=0)
    outbox_concurrency: int = Field(8, ge=1, le=256)
    # While an API process dispatching in-process is serving requests...
    outbox_busy_concurrency: int = Field(1, ge=1, le=256)
    # ...or served one less than this many seconds ago.
    outbox_idle_seconds: float = Field(0.25, ge=0, le=60)
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    # /ready's answer is reused for this long, and concurrent probes share one check.
    ready_reuse_seconds: float = Field(1.0, ge=0, le=60)

    # Personal data at rest (see soko.platform.crypto). Unset in development: derived
    # from the secret key with HKDF. Production requires both.
    encryption_keys: SecretStr = SecretStr("")
    blind_index_key: SecretStr = SecretStr("")

    # Access tokens (see soko.platform.tokens). Unset in development: an Ed25519 key is
    # generated into the data directory. Production requires one of the two.
    token_signing_keys: SecretStr = SecretStr("")
    token_signing_keys_file: Path | None = None
    token_issuer: str = ""
    token_audience: str = "soko-api"
    token_leeway_seconds: int = Field(30, ge=0, le=300)
    access_token_ttl_seconds: int = Field(900, ge=60, le=86_400)
    refresh_token_ttl_seconds: int = Field(7 * 86_400, ge=3_600, le=90 * 86_400)
    refresh_reuse_grace_seconds: float = Field(10.0, ge=0, le=120)

    # Social sign-in: JSON object of OpenID Connect providers (see docs/identity.md).
    oidc_providers: SecretStr = SecretStr("")

    # Passwords: Argon2id, at least OWASP's minimum cost (19 MiB, 2 iterations).
    password_min_length: int = Field(10, ge=8, le=64)
    password_hash_memory_kib: int = Field(19_456, ge=19_456, le=1_048_576)
    password_hash_iterations: int = Field(2, ge=2, le=20)
    password_hash_parallelism: int = Field(1, ge=1, le=16)
    password_hash_threads: int = Field(1, ge=1, le=64)
    # Where hashing runs: worker processes (no GIL shared with request handling) or a
    # thread pool of the API process.
    password_hash_pool: Literal["process", "thread"] = "process"

    # One-time codes by SMS, and sign-in throttling.
    otp_ttl_seconds: int = Field(300, ge=60, le=3_600)
    otp_max_attempts: int = Field(5, ge=1, le=20)
    otp_resend_seconds: int = Field(60, ge=10, le=3_600)
    otp_daily_limit_per_phone: int = Field(10, ge=1, le=1_000)
    otp_daily_limit_per_ip: int = Field(30, ge=1, le=100_000)
    login_rate_limit: str = "5/minute"

    # Commerce: carts, stock reservations, orders and disputes.
    default_currency: str = Field("KES", pattern=r"^[A-Z]{3}$")
    reservation_strategy: ReservationStrategy = ReservationStrategy.optimistic
    reservation_hold_seconds: int = Field(900, ge=60, le=86_400)
    # A checkout holds stock: only accounts with a verified email or phone may place one.
    checkout_requires_verified_contact: bool = True
    cart_expiry_hours: int = Field(72, ge=1, le=24 * 90)
    dispute_window_days: int = Field(14, ge=1, le=365)
    # A shipped order not marked delivered this long after it shipped may be disputed
    # as not received.
    dispute_not_received_after_days: int = Field(14, ge=1, le=365)
    idempotency_key_hours: int = Field(24, ge=1, le=24 * 30)
    seed_demo: bool = True

    # Retention: how long finished short-lived rows are kept before the purge jobs delete
    # them (docs/operations.md, "Retention"). Records (orders, payments, the ledger) and
    # the audit log are kept on purpose and never purged.
    retention_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="Days finished short-lived rows are kept: ended sign-in sessions and "
        "their refresh tokens, closed carts, ended stock reservations, email and SMS "
        "delivery records, outbound webhook deliveries and their log, and dead outbox "
        "messages",
    )
    outbox_retention_days: int = Field(
        7,
        ge=1,
        le=365,
        description="Days a done outbox message (a finished job or event) and its "
        "processed marker are kept; dead ones are kept at least `SOKO_RETENTION_DAYS`",
    )
    payment_events_retention_days: int = Field(
        90,
        ge=7,
        le=3650,
        description="Days a payment provider's handled webhook event is kept: it "
        "de-duplicates the provider's retries (days at most) and shows what the provider "
        "reported about a payment",
    )

    # Payments: providers, their credentials, commission and reconciliation.
    payment_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sandbox"],
        description="Providers a buyer may choose: sandbox, stripe, paystack, flutterwave",
    )
    payment_return_url: str = ""
    payment_http_timeout_seconds: float = Field(10.0, gt=0, le=120)
    payment_http_retries: int = Field(3, ge=1, le=10)
    payment_breaker_failures: int = Field(5, ge=1, le=1000)
    payment_breaker_reset_seconds: float = Field(30.0, gt=0, le=3600)
    payment_reconcile_after_minutes: int = Field(15, ge=1, le=24 * 60)
    commission_bps: int = Field(1000, ge=0, le=10_000)
    stripe_secret_key: SecretStr = SecretStr("")
    stripe_webhook_secret: SecretStr = SecretStr("")
    stripe_api_base: str = "https://api.stripe.com"
    paystack_secret_key: SecretStr = SecretStr("")
    paystack_api_base: str = "https://api.paystack.co"
    flutterwave_secret_key: SecretStr = SecretStr("")
    flutterwave_secret_hash: SecretStr = SecretStr("")
    flutterwave_api_base: str = "https://api.flutterwave.com"
    sandbox_webhook_secret: SecretStr = SecretStr("")
    sandbox_webhook_url: str = ""
    sandbox_delay_seconds: float = Field(1.0, ge=0, le=3600)
    sandbox_duplicate_deliveries: int = Field(0, ge=0, le=10)

    # Outbound webhooks: the time one delivery attempt may take, how much of a
    # receiver's answer is read, whether plain http is accepted outside production
    # (production always requires https), whether private, loopback and link-local
    # addresses may be called (only for local development and tests), how long a rotated
    # secret keeps signing beside the new one, and after how many hours of failing with
    # no success an endpoint is disabled.
    webhooks_timeout_seconds: float = Field(10.0, gt=0, le=60)
    webhooks_response_max_bytes: int = Field(4096, ge=0, le=1_048_576)
    webhooks_allow_http: bool = True
    webhooks_allow_private_addresses: bool = False
    webhooks_secret_overlap_hours: float = Field(24.0, ge=0, le=24 * 30)
    webhooks_disable_after_hours: float = Field(72.0, gt=0, le=24 * 60)

    # Notifications: channels, providers and templates.
    notifications_email_provider: str = Field("file", pattern=r"^(file|smtp|sendgrid)$")
    notifications_sms_provider: str = Field("file", pattern=r"^(file|africastalking|twilio)$")
    notifications_email_from: str = "Soko <no-reply@soko.invalid>"
    notifications_sms_sender: str = Field("", max_length=32)
    notifications_default_locale: str = Field("en", pattern=r"^(en|sw)$")
    notifications_admin_email: str = ""
    notifications_http_timeout_seconds: float = Field(10.0, gt=0, le=120)
    notifications_breaker_failures: int = Field(5, ge=1, le=1000)
    notifications_breaker_reset_seconds: float = Field(60.0, gt=0, le=3600)
    notifications_provider_rate_limit: str = Field("20/second", min_length=3, max_length=64)
    notifications_callback_token: SecretStr = SecretStr("")
    smtp_host: str = ""
    smtp_port: int = Field(587, ge=1, le=65_535)
    smtp_security: str = Field("starttls", pattern=r"^(starttls|tls|none)$")
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    sendgrid_api_key: SecretStr = SecretStr("")
    sendgrid_api_base: str = "https://api.sendgrid.com"
    sendgrid_webhook_public_key: SecretStr = SecretStr("")
    africastalking_username: str = ""
    africastalking_api_key: SecretStr = SecretStr("")
    africastalking_api_base: str = "https://api.africastalking.com"
    twilio_account_sid: str = ""
    twilio_auth_token: SecretStr = SecretStr("")
    twilio_api_base: str = "https://api.twilio.com"

    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.auto
    otlp_endpoint: str = ""
    service_name: str = "soko"

    @field_validator("cors_origins", "trusted_proxies", "payment_providers", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "must start with sqlite+aiosqlite://, postgresql+asyncpg:// or postgresql://"
            )
        return value

    @field_validator("database_url", mode="before")
    @classmethod
    def _rewrite_postgres_scheme(cls, value: Any) -> Any:
        if isinstance(value, str):
            for plain in ("postgresql://", "postgres://"):
                if value.startswith(plain):
                    return "postgresql+asyncpg://" + value[len(plain) :]
        return value

    @field_validator("encryption_keys")
    @classmethod
    def _encryption_keys(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value().strip():
            from soko.platform.crypto import Keyring

            Keyring.from_config(value.get_secret_value())  # KeyConfigError is a ValueError
        return value

    @field_validator("blind_index_key")
    @classmethod
    def _blind_index_key(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value().strip():
            from soko.platform.crypto import BlindIndex

            BlindIndex.from_config(value.get_secret_value())
        return value

    @field_validator("token_signing_keys")
    @classmethod
    def _token_signing_keys(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value().strip():
            from soko.platform.tokens import KeyRing

            try:
                KeyRing.from_pem_bundle(value.get_secret_value())
            except Exception:
                raise ValueError("is not a PEM bundle of Ed25519 or P-256 private keys") from None
        return value

    @field_validator("token_signing_keys_file")
    @classmethod
    def _token_signing_keys_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        try:
            text = value.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"cannot be read: {reason}") from None
        from soko.platform.tokens import KeyRing

        try:
            KeyRing.from_pem_bundle(text)
        except Exception:
            raise ValueError("is not a PEM bundle of Ed25519 or P-256 private keys") from None
        return value

    @field_validator("public_url", "app_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must have no query or fragment")
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("ratelimit_default", "login_rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"is not a rate such as '600/minute': {exc}") from None
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if not self.public_url:
            # Where this process serves, as a client on this machine reaches it.
            # Bound to every interface: this machine reaches it at the loopback address.
            wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
            host = wildcard.get(self.host, self.host)
            if ":" in host:
                host = f"[{host}]"
            self.public_url = f"http://{host}:{self.port}"
            self._public_url_derived = True
        problems = []
        uses_redis = Backend.redis in (
            self.cache_backend,
            self.ratelimit_backend,
            self.pubsub_backend,
        )
        if uses_redis and not self.redis_url:
            problems.append("SOKO_REDIS_URL is required when a backend is set to redis")
        idle = self.database_idle_in_transaction_timeout_seconds
        if idle and idle <= (longest := self.longest_outbound_wait_seconds):
            problems.append(
                "SOKO_DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS must be above the longest"
                f" outbound call a job may wait for inside its transaction ({longest:g} s"
                " with these provider timeouts and retries), or 0"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # -- derived values -----------------------------------------------------------------

    @property
    def longest_outbound_wait_seconds(self) -> float:
        """The longest a job may wait for one outbound call inside its transaction: a
        notification provider's call, a webhook endpoint's, or a payment provider's,
        whose attempts start only within its timeout of the first (the last one then
        lasting up to the timeout, after a wait the provider asked for)."""
        payment = self.payment_http_timeout_seconds
        if self.payment_http_retries > 1:
            payment = 2 * payment + PROVIDER_RETRY_AFTER_MAX_SECONDS
        return max(payment, self.notifications_http_timeout_seconds, self.webhooks_timeout_seconds)

    @property
    def is_production(self) -> bool:
        return self.env is Environment.production

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'soko.db').as_posix()}"

    @property
    def effective_app_url(self) -> str:
        """Where links in messages lead: the marketplace's app, or Soko's own pages."""
        return (self.app_url or self.public_url).rstrip("/")

    @property
    def effective_token_issuer(self) -> str:
        """SOKO_TOKEN_ISSUER, else SOKO_PUBLIC_URL when set. A public URL derived from
        the port does not name the issuer: processes serving one database on several
        ports (or a script minting tokens) must agree on it."""
        if self.token_issuer:
            return self.token_issuer
        return DEFAULT_TOKEN_ISSUER if self._public_url_derived else self.public_url.rstrip("/")

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    def in_memory_shared_concerns(self) -> list[str]:
        """The shared concerns still kept in one process's memory."""
        pairs = {
            "cache": self.cache_backend,
            "rate limits": self.ratelimit_backend,
            "pub/sub": self.pubsub_backend,
        }
        return [name for name, backend in pairs.items() if backend is Backend.memory]

    def multi_process_problems(self, processes: int | None = None) -> list[str]:
        """Why this configuration cannot run as several processes, if it cannot."""
        processes = self.workers if processes is None else processes
        several = processes > 1 or self.outbox_dispatch is OutboxDispatch.worker
        if not several:
            return []
        memory = self.in_memory_shared_concerns()
        if not memory:
            return []
        reasons = []
        if processes > 1:
            reasons.append(f"{processes} API processes (SOKO_WORKERS={processes})")
        if self.outbox_dispatch is OutboxDispatch.worker:
            reasons.append("`soko worker` processes running the jobs (SOKO_OUTBOX_DISPATCH=worker)")
        kept = memory[0] if len(memory) == 1 else f"{', '.join(memory[:-1])} and {memory[-1]}"
        verb = "are" if len(memory) > 1 or memory[0] == "rate limits" else "is"
        return [
            f"this configuration runs {' and '.join(reasons)}, but the {kept} {verb} kept in "
            "each process's own memory, so the processes would not see each other's: set "
            "SOKO_REDIS_URL, and SOKO_CACHE_BACKEND, SOKO_RATELIMIT_BACKEND and "
            "SOKO_PUBSUB_BACKEND to redis"
        ]

    @field_validator("payment_providers")
    @classmethod
    def _payment_providers(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        unknown = sorted(set(names) - set(PAYMENT_PROVIDER_CREDENTIALS))
        if unknown:
            known = ", ".join(PAYMENT_PROVIDER_CREDENTIALS)
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {known}")
        if not names:
            raise ValueError("name at least one provider")
        return list(dict.fromkeys(names))

    def payment_credential_problems(self) -> list[str]:
        """An enabled provider whose credentials are missing: its payments could not
        start and its webhooks could not be verified."""
        problems = []
        for name in self.payment_providers:
            for field_name in PAYMENT_PROVIDER_CREDENTIALS[name]:
                secret = getattr(self, field_name)
                if not secret.get_secret_value():
                    problems.append(
                        f"SOKO_{field_name.upper()} must be set while SOKO_PAYMENT_PROVIDERS "
                        f"includes {name}"
                    )
        return problems

    def notification_provider_problems(self) -> list[str]:
        """The chosen email and SMS providers' missing credentials, and (in production)
        the ``file`` channel, which writes every message to the server's disk, sign-in
        codes and links included, and sends nothing."""
        problems = []
        chosen = {
            "SOKO_NOTIFICATIONS_EMAIL_PROVIDER": self.notifications_email_provider,
            "SOKO_NOTIFICATIONS_SMS_PROVIDER": self.notifications_sms_provider,
        }
        for variable, provider in chosen.items():
            if provider == "file":
                if self.is_production:
                    problems.append(
                        f"{variable} may not be file in production (it writes each message, "
                        "codes and links included, to the server's disk and sends nothing): "
                        "name a real provider"
                    )
                continue
            for field_name in NOTIFICATION_PROVIDER_CREDENTIALS[provider]:
                value = getattr(self, field_name)
                text = value.get_secret_value() if isinstance(value, SecretStr) else value
                if not text.strip():
                    problems.append(
                        f"SOKO_{field_name.upper()} must be set while {variable} is {provider}"
                    )
        return problems

    def production_problems(self) -> list[str]:
        """What production mode refuses in this configuration."""
        if not self.is_production:
            return []
        problems = []
        if not self.encryption_keys.get_secret_value():
            problems.append(
                "SOKO_ENCRYPTION_KEYS must be set in production (keys derived from the "
                "secret key would make every stored email and phone unreadable if it changed)"
            )
        if not self.blind_index_key.get_secret_value():
            problems.append("SOKO_BLIND_INDEX_KEY must be set in production")
        if not (self.token_signing_keys.get_secret_value() or self.token_signing_keys_file):
            problems.append(
                "SOKO_TOKEN_SIGNING_KEYS or SOKO_TOKEN_SIGNING_KEYS_FILE must be set in "
                "production (generated signing keys are for development only)"
            )
        if len(self.secret_key.get_secret_value()) < 32:
            problems.append(
                "SOKO_SECRET_KEY must be set to at least 32 random characters in production "
                "(generated secrets are for development only)"
            )
        if self.is_sqlite:
            problems.append("SOKO_DATABASE_URL must point at PostgreSQL in production")
        if self._public_url_derived:
            problems.append(
                "SOKO_PUBLIC_URL must be set in production to the address clients reach the "
                "API at (links, webhook URLs and the tokens' issuer are built from it)"
            )
        if "sandbox" in self.payment_providers:
            problems.append(
                "SOKO_PAYMENT_PROVIDERS may not include sandbox in production (its page "
                "lets anyone mark a payment paid)"
            )
        problems.extend(self.payment_credential_problems())
        problems.extend(self.notification_provider_problems())
        if self.webhooks_allow_private_addresses:
            problems.append(
                "SOKO_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES may not be true in production (it "
                "lets a registered webhook URL reach internal services)"
            )
        if any("*" in origin for origin in self.cors_origins):
            problems.append("SOKO_CORS_ORIGINS may not contain a wildcard in production")
        problems.extend(self.multi_process_problems())
        return problems


PAYMENT_PROVIDER_CREDENTIALS: dict[str, tuple[str, ...]] = {
    "sandbox": (),
    "stripe": ("stripe_secret_key", "stripe_webhook_secret"),
    "paystack": ("paystack_secret_key",),
    "flutterwave": ("flutterwave_secret_key", "flutterwave_secret_hash"),
}


NOTIFICATION_PROVIDER_CREDENTIALS: dict[str, tuple[str, ...]] = {
    "smtp": ("smtp_host",),
    "sendgrid": ("sendgrid_api_key",),
    "africastalking": ("africastalking_username", "africastalking_api_key"),
    "twilio": ("twilio_account_sid", "twilio_auth_token"),
}


def _format_validation_error(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        name = f"SOKO_{field.upper()}" if field != "settings" else "configuration"
        raw = item.get("input")
        model_field = Settings.model_fields.get(field)
        secret = "secret" in field or (
            model_field is not None and model_field.annotation is SecretStr
        )
        shown = "" if isinstance(raw, dict) or secret else f" (got {raw!r})"
        lines.append(f"{name}: {message}{shown}")
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings; raise :class:`ConfigError` with one line per problem."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    problems = settings.production_problems()
    if problems:
        raise ConfigError(problems)
    return settings


def ensure_secrets(settings: Settings) -> Settings:
    """Fill secrets that were not configured from the data directory, creating them once.

    The file is created with mode 0600 before anything is written to it. Production never
    reaches this path for a missing secret: :func:`load_settings` refuses it first.
    """
    if settings.secret_key.get_secret_value():
        return settings
    stored = load_generated_secrets(settings.data_dir)
    return settings.model_copy(update={"secret_key": SecretStr(stored["secret_key"])})


def load_generated_secrets(data_dir: Path) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / GENERATED_SECRETS_FILE
    if not path.exists():
        _publish_generated_secrets(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        path.chmod(0o600)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        data = exc
    if not isinstance(data, dict) or not isinstance(data.get("secret_key"), str):
        raise ConfigError(
            [
                f"{path} is not a secrets file Soko can read: delete it to generate new "
                "secrets (what the old ones signed stops being valid), or set SOKO_SECRET_KEY"
            ]
        )
    return {str(key): str(value) for key, value in data.items()}


def _publish_generated_secrets(path: Path) -> None:
    """Write fresh secrets to ``path`` unless another process got there first (the first
    writer's secrets win; nobody reads a half-written file)."""
    publish_once(path, json.dumps({"secret_key": secrets.token_urlsafe(48)}))
