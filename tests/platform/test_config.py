"""Settings: validation with one clear line per problem, production refusals, generated
secrets, URL and list parsing, and the documented example file."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from soko.platform.config import (
    GENERATED_SECRETS_FILE,
    ConfigError,
    Settings,
    ensure_secrets,
    load_generated_secrets,
    load_settings,
)
from tests.platform.together import answers_of_processes_released_together

ROOT = Path(__file__).resolve().parents[2]
GOOD_SECRET = "k" * 32
POSTGRES = "postgresql+asyncpg://soko:pw@db.internal:5432/soko"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Settings come only from what each test sets: no inherited SOKO_* variable and no
    .env file from the directory the tests were started in."""
    for name in list(os.environ):
        if name.startswith("SOKO_"):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def _problems(**env: str) -> list[str]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigError) as caught:
            load_settings()
    return caught.value.problems


def _production(**env: str) -> dict[str, str]:
    """A production configuration that starts, with ``env`` on top."""
    values = {
        "SOKO_ENV": "production",
        "SOKO_PUBLIC_URL": "https://api.shop.example",
        "SOKO_SECRET_KEY": GOOD_SECRET,
        "SOKO_DATABASE_URL": POSTGRES,
        "SOKO_ENCRYPTION_KEYS": PRODUCTION_KEYS["encryption"],
        "SOKO_BLIND_INDEX_KEY": PRODUCTION_KEYS["blind_index"],
        "SOKO_TOKEN_SIGNING_KEYS": PRODUCTION_KEYS["signing"],
        "SOKO_PAYMENT_PROVIDERS": "paystack",
        "SOKO_PAYSTACK_SECRET_KEY": "sk_live_0123456789abcdef",
        "SOKO_NOTIFICATIONS_EMAIL_PROVIDER": "smtp",
        "SOKO_SMTP_HOST": "smtp.example.com",
        "SOKO_NOTIFICATIONS_SMS_PROVIDER": "africastalking",
        "SOKO_AFRICASTALKING_USERNAME": "soko",
        "SOKO_AFRICASTALKING_API_KEY": "atsk_0123456789abcdef",
    }
    values.update(env)
    return values


def _production_keys() -> dict[str, str]:
    import base64
    import secrets

    from soko.platform.crypto import new_key_spec
    from soko.platform.tokens import KeyRing

    return {
        "encryption": new_key_spec("k1"),
        "blind_index": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "signing": KeyRing.generate().pem_bundle(),
    }


PRODUCTION_KEYS = _production_keys()


# -- one clear line per problem --------------------------------------------------------


def test_defaults_load() -> None:
    settings = load_settings()
    assert settings.port == 8000
    assert settings.is_sqlite
    assert settings.effective_database_url == "sqlite+aiosqlite:///var/soko.db"


def test_each_bad_value_is_one_line_naming_its_variable() -> None:
    problems = _problems(
        SOKO_PORT="eighty",
        SOKO_WORKERS="0",
        SOKO_LOG_LEVEL="LOUD",
        SOKO_DATABASE_URL="mysql://db/soko",
        SOKO_REDIS_URL="http://cache",
        SOKO_RATELIMIT_DEFAULT="lots",
        SOKO_CACHE_BACKEND="disk",
        SOKO_DATABASE_ECHO="perhaps",
    )
    assert len(problems) == 8, problems
    for problem in problems:
        assert "\n" not in problem
    named = {problem.split(":", 1)[0] for problem in problems}
    assert named == {
        "SOKO_PORT",
        "SOKO_WORKERS",
        "SOKO_LOG_LEVEL",
        "SOKO_DATABASE_URL",
        "SOKO_REDIS_URL",
        "SOKO_RATELIMIT_DEFAULT",
        "SOKO_CACHE_BACKEND",
        "SOKO_DATABASE_ECHO",
    }
    by_name = {problem.split(":", 1)[0]: problem for problem in problems}
    assert "'eighty'" in by_name["SOKO_PORT"]
    assert "DEBUG" in by_name["SOKO_LOG_LEVEL"]
    assert "postgresql+asyncpg://" in by_name["SOKO_DATABASE_URL"]


def test_error_message_is_the_problem_lines() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(port=0, log_level="LOUD")
    assert str(caught.value).splitlines() == caught.value.problems
    assert len(caught.value.problems) == 2


def test_a_bad_secret_is_never_echoed() -> None:
    problems = _problems(SOKO_ENV="production", SOKO_SECRET_KEY="hunter2-short")
    assert any("SOKO_SECRET_KEY" in problem for problem in problems)
    assert not any("hunter2" in problem for problem in problems)


def test_redis_backend_needs_a_redis_url() -> None:
    problems = _problems(SOKO_CACHE_BACKEND="redis")
    assert len(problems) == 1
    assert "SOKO_REDIS_URL" in problems[0]


def test_dotenv_file_is_read_and_the_environment_wins(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environment / ".env").write_text(
        "SOKO_PORT=9001\nSOKO_SERVICE_NAME=from-dotenv\n", encoding="utf-8"
    )
    monkeypatch.setenv("SOKO_SERVICE_NAME", "from-environment")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.service_name == "from-environment"


# -- production refusals ---------------------------------------------------------------


def test_a_good_production_configuration_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _production(SOKO_CORS_ORIGINS="https://shop.example.com").items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.is_production
    assert settings.production_problems() == []


def _documented_minimum() -> dict[str, str]:
    """The variables of docs/operations.md's "minimum for production" block."""
    text = (ROOT / "docs" / "operations.md").read_text()
    block = text.split("The minimum for production:", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    values = {}
    for line in block.splitlines():
        name, _, value = line.split("#", 1)[0].strip().partition("=")
        values[name] = value.strip('"')
    return values


def test_the_documented_production_minimum_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    documented = _documented_minimum()
    # Every documented variable is a setting, and nothing production requires is missing
    # from the block: with its placeholders replaced by real values, it starts.
    fillers = {
        "SOKO_SECRET_KEY": GOOD_SECRET,
        "SOKO_ENCRYPTION_KEYS": PRODUCTION_KEYS["encryption"],
        "SOKO_BLIND_INDEX_KEY": PRODUCTION_KEYS["blind_index"],
        "SOKO_TOKEN_SIGNING_KEYS": PRODUCTION_KEYS["signing"],
    }
    assert set(fillers) <= set(documented)
    for name, value in documented.items():
        assert name.removeprefix("SOKO_").lower() in Settings.model_fields, name
        monkeypatch.setenv(name, fillers.get(name, value))
    settings = load_settings()
    assert settings.is_production
    assert settings.production_problems() == []


def test_compose_passes_every_setting_production_requires() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    required = (
        "SOKO_ENV",
        "SOKO_PUBLIC_URL",
        "SOKO_SECRET_KEY",
        "SOKO_ENCRYPTION_KEYS",
        "SOKO_BLIND_INDEX_KEY",
        "SOKO_TOKEN_SIGNING_KEYS",
        "SOKO_DATABASE_URL",
        "SOKO_PAYMENT_PROVIDERS",
        "SOKO_STRIPE_SECRET_KEY",
        "SOKO_STRIPE_WEBHOOK_SECRET",
        "SOKO_PAYSTACK_SECRET_KEY",
        "SOKO_FLUTTERWAVE_SECRET_KEY",
        "SOKO_FLUTTERWAVE_SECRET_HASH",
        "SOKO_NOTIFICATIONS_EMAIL_PROVIDER",
        "SOKO_NOTIFICATIONS_SMS_PROVIDER",
        "SOKO_SMTP_HOST",
        "SOKO_SMTP_USERNAME",
        "SOKO_SMTP_PASSWORD",
        "SOKO_SENDGRID_API_KEY",
        "SOKO_AFRICASTALKING_USERNAME",
        "SOKO_AFRICASTALKING_API_KEY",
        "SOKO_TWILIO_ACCOUNT_SID",
        "SOKO_TWILIO_AUTH_TOKEN",
    )
    missing = [name for name in required if f"  {name}: " not in compose]
    assert missing == []


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({"SOKO_SECRET_KEY": ""}, "SOKO_SECRET_KEY", id="missing-secret"),
        pytest.param({"SOKO_PUBLIC_URL": ""}, "SOKO_PUBLIC_URL", id="missing-public-url"),
        pytest.param(
            {"SOKO_ENCRYPTION_KEYS": ""}, "SOKO_ENCRYPTION_KEYS", id="missing-encryption-keys"
        ),
        pytest.param(
            {"SOKO_BLIND_INDEX_KEY": ""}, "SOKO_BLIND_INDEX_KEY", id="missing-blind-index-key"
        ),
        pytest.param(
            {"SOKO_TOKEN_SIGNING_KEYS": ""}, "SOKO_TOKEN_SIGNING_KEYS", id="missing-signing-keys"
        ),
        pytest.param({"SOKO_SECRET_KEY": "s" * 31}, "SOKO_SECRET_KEY", id="short-secret"),
        pytest.param({"SOKO_DATABASE_URL": ""}, "SOKO_DATABASE_URL", id="default-sqlite"),
        pytest.param(
            {"SOKO_DATABASE_URL": "sqlite+aiosqlite:///var/prod.db"},
            "SOKO_DATABASE_URL",
            id="explicit-sqlite",
        ),
        pytest.param(
            {"SOKO_CORS_ORIGINS": "https://shop.example.com,*"},
            "SOKO_CORS_ORIGINS",
            id="wildcard-cors",
        ),
        pytest.param(
            {"SOKO_CORS_ORIGINS": "https://*.example.com"},
            "SOKO_CORS_ORIGINS",
            id="wildcard-subdomain-cors",
        ),
        pytest.param({"SOKO_WORKERS": "4"}, "SOKO_WORKERS=4", id="several-processes-in-memory"),
        pytest.param(
            {"SOKO_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES": "true"},
            "SOKO_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES",
            id="webhooks-to-private-addresses",
        ),
        pytest.param(
            {"SOKO_PAYMENT_PROVIDERS": "paystack,sandbox"},
            "SOKO_PAYMENT_PROVIDERS",
            id="sandbox-payments",
        ),
        pytest.param(
            {"SOKO_PAYMENT_PROVIDERS": "paystack,stripe", "SOKO_STRIPE_SECRET_KEY": "sk_x"},
            "SOKO_STRIPE_WEBHOOK_SECRET",
            id="provider-without-credentials",
        ),
        pytest.param(
            {"SOKO_OUTBOX_DISPATCH": "worker"},
            "SOKO_OUTBOX_DISPATCH=worker",
            id="separate-workers-in-memory",
        ),
        pytest.param(
            {"SOKO_NOTIFICATIONS_EMAIL_PROVIDER": "file"},
            "SOKO_NOTIFICATIONS_EMAIL_PROVIDER may not be file",
            id="emails-written-to-files",
        ),
        pytest.param(
            {"SOKO_NOTIFICATIONS_SMS_PROVIDER": "file"},
            "SOKO_NOTIFICATIONS_SMS_PROVIDER may not be file",
            id="sms-written-to-files",
        ),
        pytest.param(
            {"SOKO_NOTIFICATIONS_SMS_PROVIDER": "twilio", "SOKO_TWILIO_ACCOUNT_SID": "AC1"},
            "SOKO_TWILIO_AUTH_TOKEN",
            id="sms-provider-without-credentials",
        ),
        pytest.param(
            {"SOKO_NOTIFICATIONS_EMAIL_PROVIDER": "sendgrid"},
            "SOKO_SENDGRID_API_KEY",
            id="email-provider-without-credentials",
        ),
    ],
)
def test_production_refuses(env: dict[str, str], variable: str) -> None:
    problems = _problems(**_production(**env))
    assert len(problems) == 1, problems
    assert variable in problems[0]


def test_production_lists_every_refusal_at_once() -> None:
    problems = _problems(
        SOKO_ENV="production", SOKO_CORS_ORIGINS="*", SOKO_WORKERS="2", SOKO_SECRET_KEY=""
    )
    assert len(problems) == 11, problems
    joined = "\n".join(problems)
    for variable in (
        "SOKO_PUBLIC_URL",
        "SOKO_PAYMENT_PROVIDERS",
        "SOKO_NOTIFICATIONS_EMAIL_PROVIDER",
        "SOKO_NOTIFICATIONS_SMS_PROVIDER",
        "SOKO_SECRET_KEY",
        "SOKO_DATABASE_URL",
        "SOKO_CORS_ORIGINS",
        "SOKO_WORKERS",
        "SOKO_ENCRYPTION_KEYS",
        "SOKO_BLIND_INDEX_KEY",
        "SOKO_TOKEN_SIGNING_KEYS",
    ):
        assert variable in joined


def test_the_public_url_follows_the_port_unless_set() -> None:
    derived = Settings(_env_file=None, port=8123)  # type: ignore[call-arg]
    assert derived.public_url == "http://127.0.0.1:8123"
    # The issuer does not follow the port: processes on other ports accept the tokens.
    assert derived.effective_token_issuer == "soko"
    assert derived.effective_app_url == "http://127.0.0.1:8123"
    everywhere = Settings(_env_file=None, host="0.0.0.0", port=80)  # type: ignore[call-arg]
    assert everywhere.public_url == "http://127.0.0.1:80"
    v6 = Settings(_env_file=None, host="::1", port=8000)  # type: ignore[call-arg]
    assert v6.public_url == "http://[::1]:8000"
    given = Settings(  # type: ignore[call-arg]
        _env_file=None, port=8123, public_url="https://api.shop.example/", app_url=""
    )
    assert given.public_url == "https://api.shop.example"
    assert given.effective_token_issuer == "https://api.shop.example"
    assert given.effective_app_url == "https://api.shop.example"


@pytest.mark.parametrize("value", ["ftp://x.example", "api.shop.example", "https://x.example/?a=1"])
@pytest.mark.parametrize("variable", ["SOKO_PUBLIC_URL", "SOKO_APP_URL"])
def test_base_urls_must_be_absolute_http_urls(variable: str, value: str) -> None:
    [problem] = _problems(**{variable: value})
    assert problem.startswith(f"{variable}: ")


def test_development_allows_what_production_refuses() -> None:
    settings = load_settings(cors_origins="*", workers=1)
    assert settings.production_problems() == []


# -- several processes need shared backends ---------------------------------------------


def test_one_process_may_keep_everything_in_memory() -> None:
    assert Settings(_env_file=None).multi_process_problems() == []  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("overrides", "in_memory"),
    [
        ({}, "the cache, rate limits and pub/sub are kept"),
        ({"cache_backend": "redis"}, "the rate limits and pub/sub are kept"),
        ({"cache_backend": "redis", "ratelimit_backend": "redis"}, "the pub/sub is kept"),
        ({"pubsub_backend": "redis"}, "the cache and rate limits are kept"),
        ({"pubsub_backend": "redis", "ratelimit_backend": "redis"}, "the cache is kept"),
    ],
)
def test_several_processes_name_what_is_still_in_memory(
    overrides: dict[str, str], in_memory: str
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, workers=3, redis_url="redis://127.0.0.1:6379/0", **overrides
    )
    problems = settings.multi_process_problems()
    assert len(problems) == 1
    assert f"but {in_memory} in each process's own memory" in problems[0]
    assert "SOKO_WORKERS=3" in problems[0]


def test_separate_workers_count_as_several_processes() -> None:
    settings = Settings(_env_file=None, outbox_dispatch="worker")  # type: ignore[call-arg]
    problems = settings.multi_process_problems()
    assert len(problems) == 1
    assert "SOKO_OUTBOX_DISPATCH=worker" in problems[0]


def test_process_count_can_be_given_by_the_caller() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.multi_process_problems(1) == []
    assert "SOKO_WORKERS=2" in settings.multi_process_problems(2)[0]


def test_redis_everywhere_allows_several_processes() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        workers=8,
        outbox_dispatch="worker",
        redis_url="redis://127.0.0.1:6379/0",
        cache_backend="redis",
        ratelimit_backend="redis",
        pubsub_backend="redis",
    )
    assert settings.in_memory_shared_concerns() == []
    assert settings.multi_process_problems() == []


# -- generated secrets -----------------------------------------------------------------


def test_generated_secret_file_is_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    first = ensure_secrets(load_settings(data_dir=data_dir))
    path = data_dir / GENERATED_SECRETS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = first.secret_key.get_secret_value()
    assert len(key) >= 32
    assert json.loads(path.read_text(encoding="utf-8")) == {"secret_key": key}

    second = ensure_secrets(load_settings(data_dir=data_dir))
    assert second.secret_key.get_secret_value() == key


def test_generated_secrets_differ_between_data_dirs(tmp_path: Path) -> None:
    one = ensure_secrets(load_settings(data_dir=tmp_path / "one"))
    two = ensure_secrets(load_settings(data_dir=tmp_path / "two"))
    assert one.secret_key.get_secret_value() != two.secret_key.get_secret_value()


def test_a_loosened_secrets_file_is_made_private_again(tmp_path: Path) -> None:
    ensure_secrets(load_settings(data_dir=tmp_path))
    path = tmp_path / GENERATED_SECRETS_FILE
    path.chmod(0o644)
    ensure_secrets(load_settings(data_dir=tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_generating_leaves_only_the_secrets_file(tmp_path: Path) -> None:
    ensure_secrets(load_settings(data_dir=tmp_path / "d"))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [GENERATED_SECRETS_FILE]


def _generated_secret(data_dir: str) -> str:
    return load_generated_secrets(Path(data_dir))["secret_key"]


@pytest.mark.slow
def test_processes_starting_together_share_one_secret(tmp_path: Path) -> None:
    """Processes released at the same moment on an empty data dir all end up with the
    first writer's secret; none reads a half-written file."""
    for attempt in range(5):
        data_dir = tmp_path / f"round-{attempt}"
        keys = answers_of_processes_released_together(_generated_secret, str(data_dir))
        stored = json.loads((data_dir / GENERATED_SECRETS_FILE).read_text(encoding="utf-8"))
        assert keys == {stored["secret_key"]}


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"other": 1}', '{"secret_key": 7}'])
def test_an_unreadable_secrets_file_is_a_problem_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / GENERATED_SECRETS_FILE
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        ensure_secrets(load_settings(data_dir=tmp_path))
    (problem,) = caught.value.problems
    assert str(path) in problem
    assert "SOKO_SECRET_KEY" in problem


def test_a_configured_secret_is_used_and_nothing_is_generated(tmp_path: Path) -> None:
    settings = ensure_secrets(load_settings(data_dir=tmp_path, secret_key=GOOD_SECRET))
    assert settings.secret_key.get_secret_value() == GOOD_SECRET
    assert not (tmp_path / GENERATED_SECRETS_FILE).exists()


def test_secret_is_hidden_in_repr() -> None:
    settings = load_settings(secret_key=GOOD_SECRET)
    assert GOOD_SECRET not in repr(settings)
    assert GOOD_SECRET not in str(settings.model_dump())


# -- URLs and lists --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql+asyncpg://u:p@h:5432/d"),
        ("postgres://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite+aiosqlite:///var/x.db", "sqlite+aiosqlite:///var/x.db"),
    ],
)
def test_database_url_schemes(monkeypatch: pytest.MonkeyPatch, given: str, expected: str) -> None:
    monkeypatch.setenv("SOKO_DATABASE_URL", given)
    settings = load_settings()
    assert settings.database_url == expected
    assert settings.effective_database_url == expected
    assert settings.is_sqlite is expected.startswith("sqlite")


def test_default_database_lives_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "d")
    assert settings.effective_database_url == (
        f"sqlite+aiosqlite:///{(tmp_path / 'd' / 'soko.db').as_posix()}"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", []),
        ("https://a.example", ["https://a.example"]),
        ("https://a.example,https://b.example", ["https://a.example", "https://b.example"]),
        (" https://a.example , ,https://b.example ", ["https://a.example", "https://b.example"]),
        ('["https://a.example", "https://b.example"]', ["https://a.example", "https://b.example"]),
        ("  []  ", []),
    ],
)
def test_list_settings_take_commas_or_json(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]
) -> None:
    monkeypatch.setenv("SOKO_CORS_ORIGINS", raw)
    monkeypatch.setenv("SOKO_TRUSTED_PROXIES", raw)
    settings = load_settings()
    assert settings.cors_origins == expected
    assert settings.trusted_proxies == expected


def test_a_broken_json_list_is_a_problem_line() -> None:
    problems = _problems(SOKO_CORS_ORIGINS='["https://a.example"')
    assert len(problems) == 1
    assert problems[0].startswith("SOKO_CORS_ORIGINS:")


# -- the documented example ------------------------------------------------------------

_EXAMPLE_KEY = re.compile(r"^\s*#?\s*(SOKO_[A-Z0-9_]+)=", re.MULTILINE)


def _example_keys() -> set[str]:
    path = ROOT / ".env.example"
    if not path.exists():
        pytest.fail(".env.example is missing: it must document every setting")
    return set(_EXAMPLE_KEY.findall(path.read_text(encoding="utf-8")))


def test_env_example_documents_every_setting() -> None:
    expected = {f"SOKO_{name.upper()}" for name in Settings.model_fields}
    missing = sorted(expected - _example_keys())
    assert missing == [], f".env.example does not document {missing}"


def test_env_example_documents_no_unknown_setting() -> None:
    known = {f"SOKO_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(key for key in _example_keys() - known if not key.startswith("SOKO_TEST_"))
    assert unknown == [], f".env.example documents settings Soko does not read: {unknown}"


def test_env_example_as_dotenv_gives_a_valid_configuration(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(
        (ROOT / ".env.example").read_text(encoding="utf-8"), encoding="utf-8"
    )
    settings = load_settings()
    assert settings.multi_process_problems() == []
