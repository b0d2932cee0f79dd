"""Settings: precedence of the four sources, parsing, one-line errors, no secret leaks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amiworker.settings import ServerSettings, Settings, SettingsError, redact_uri

SECRET = "s3cr3t-do-not-print"
PASSWORD = "mongo-pw-do-not-print"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AMIWORKER_* variable from the outside, and a cwd without a .env file."""
    for name in list(os.environ):
        if name.startswith("AMIWORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def server(name: str = "pbx1", **extra: object) -> dict[str, object]:
    return {"name": name, "host": "10.0.0.5", "username": "amiworker", "secret": SECRET, **extra}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def load_error(**kwargs: object) -> str:
    with pytest.raises(SettingsError) as info:
        Settings.load(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.servers == []
    assert settings.mongo_uri == "mongodb://127.0.0.1:27017"
    assert (settings.database, settings.collection, settings.driver) == (
        "amiworker",
        "events",
        "pymongo",
    )
    assert settings.handlers == ["handlers"]
    assert settings.app_dir == Path(".")
    assert settings.race == "channel"
    assert settings.batch_size == 500 and settings.batch_delay == 0.0
    assert settings.handler_backlog == 2000 and settings.claim_mode == "race"
    assert settings.lease == 10.0 and settings.heartbeat_interval == 2.0
    assert settings.metrics_port is None and settings.ttl_days is None


def test_every_field_is_documented() -> None:
    for model in (Settings, ServerSettings):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_precedence_flag_over_env_over_dotenv_over_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    toml = write(
        tmp_path / "amiworker.toml",
        'workers = 1\nbatch_size = 11\ndatabase = "from_toml"\ncollection = "toml_events"\n'
        'log_level = "debug"\n',
    )
    write(
        tmp_path / ".env",
        "AMIWORKER_WORKERS=2\nAMIWORKER_BATCH_SIZE=22\nAMIWORKER_DATABASE=from_dotenv\n"
        "UNRELATED_TOOL_SETTING=ignored\n",
    )
    monkeypatch.setenv("AMIWORKER_WORKERS", "3")
    monkeypatch.setenv("AMIWORKER_BATCH_SIZE", "33")

    settings = Settings.load(toml, workers=4)

    assert settings.workers == 4  # flag beats everything
    assert settings.batch_size == 33  # environment beats .env and TOML
    assert settings.database == "from_dotenv"  # .env beats TOML
    assert settings.collection == "toml_events"  # TOML beats the default
    assert settings.log_level == "DEBUG"


def test_none_flags_fall_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIWORKER_WORKERS", "3")
    assert Settings.load(workers=None).workers == 3


def test_explicit_env_file(tmp_path: Path) -> None:
    elsewhere = tmp_path / "conf"
    elsewhere.mkdir()
    env = write(elsewhere / "prod.env", "AMIWORKER_WORKERS=7\n")
    write(tmp_path / ".env", "AMIWORKER_WORKERS=2\n")
    assert Settings.load(env_file=env).workers == 7
    assert Settings.load(env_file=None).workers == 1


def test_servers_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AMIWORKER_SERVERS",
        json.dumps([server("pbx1"), server("pbx2", port=5039, auth="plain", tls=False)]),
    )
    settings = Settings.load()
    assert [s.name for s in settings.servers] == ["pbx1", "pbx2"]
    first, second = settings.servers
    assert (first.host, first.port, first.auth, first.events) == ("10.0.0.5", 5038, "md5", "on")
    assert first.secret.get_secret_value() == SECRET
    assert (second.port, second.auth) == (5039, "plain")


def test_servers_from_toml_tables(tmp_path: Path) -> None:
    toml = write(
        tmp_path / "c.toml",
        f"""
handlers = ["handlers", "billing"]

[[servers]]
name = "pbx1"
host = "10.0.0.5"
username = "amiworker"
secret = "{SECRET}"

[[servers]]
name = "pbx2"
host = "10.0.0.6"
username = "amiworker"
secret = "{SECRET}"
tls = true
tls_ca_file = "/etc/ssl/pbx.pem"
""",
    )
    settings = Settings.load(toml)
    assert [s.name for s in settings.servers] == ["pbx1", "pbx2"]
    assert settings.servers[1].tls_ca_file == Path("/etc/ssl/pbx.pem")
    assert settings.handlers == ["handlers", "billing"]


@pytest.mark.parametrize(
    "value",
    ["handlers,billing", " handlers , billing ,", '["handlers", "billing"]'],
)
def test_handlers_from_env(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AMIWORKER_HANDLERS", value)
    assert Settings.load().handlers == ["handlers", "billing"]


def test_handlers_from_dotenv(tmp_path: Path) -> None:
    write(tmp_path / ".env", "AMIWORKER_HANDLERS=handlers,billing.cdr\n")
    assert Settings.load().handlers == ["handlers", "billing.cdr"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"servers": [server(port="abc")]},
            "invalid setting servers.0.port: Input should be a valid integer, unable to parse "
            "string as an integer (got 'abc')",
        ),
        (
            {"servers": [server(port=70000)]},
            "invalid setting servers.0.port: Input should be less than or equal to 65535 "
            "(got 70000)",
        ),
        (
            {"servers": [server(auth="sha1")]},
            "invalid setting servers.0.auth: Input should be 'md5' or 'plain' (got 'sha1')",
        ),
        (
            {"servers": [server(name="")]},
            "invalid setting servers.0.name: String should have at least 1 character (got '')",
        ),
        (
            {"servers": [server("pbx1"), server("pbx1")]},
            "invalid setting servers: server name 'pbx1' is used twice; names must be unique",
        ),
        (
            {"servers": [{"name": "pbx1", "host": "h", "username": "u"}]},
            "invalid setting servers.0.secret: is required but not set",
        ),
        (
            {"servers": [server(password="x")]},
            "invalid setting servers.0.password: is not a known setting",
        ),
        (
            {"servers": [server(tls_ca_file="/ca.pem")]},
            "invalid setting servers.0.tls_ca_file: is set but tls is false; set tls = true or "
            "remove it (got '/ca.pem')",
        ),
        ({"workers": 0}, "invalid setting workers: Input should be greater than or equal to 1"),
        ({"driver": "mongoengine"}, "invalid setting driver: Input should be 'pymongo' or 'motor'"),
        ({"race": "some"}, "invalid setting race: Input should be 'channel', 'all' or 'none'"),
        ({"lease": 4.0}, "invalid setting lease: must exceed 2 * heartbeat_interval (4s)"),
        ({"reconnect_min": 5, "reconnect_max": 1}, "invalid setting reconnect_max: must be at"),
        ({"handlers": ["good", "not-a-module"]}, "invalid setting handlers: 'not-a-module' is"),
        ({"log_level": "LOUD"}, "invalid setting log_level: Input should be 'DEBUG'"),
        ({"metrics_port": 0}, "invalid setting metrics_port: Input should be greater than"),
        ({"ttl_days": -1}, "invalid setting ttl_days: Input should be greater than 0"),
        ({"mongo_uri": "localhost:27017"}, "invalid setting mongo_uri: must start with mongodb://"),
    ],
)
def test_invalid_values_give_one_line_naming_the_field(
    kwargs: dict[str, object], expected: str
) -> None:
    message = load_error(**kwargs)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert SECRET not in message


def test_several_problems_give_one_line_each() -> None:
    message = load_error(workers=0, batch_size=0, servers=[server(port="x")])
    lines = message.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("invalid setting ") for line in lines)
    assert {line.split(":")[0] for line in lines} == {
        "invalid setting workers",
        "invalid setting batch_size",
        "invalid setting servers.0.port",
    }


def test_invalid_env_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIWORKER_BATCH_SIZE", "lots")
    assert load_error() == (
        "invalid setting batch_size: Input should be a valid integer, unable to parse string "
        "as an integer (got 'lots')"
    )


def test_env_servers_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIWORKER_SERVERS", f'[{{"name": "pbx1", "secret": "{SECRET}"')
    message = load_error()
    assert message.startswith(
        "invalid setting servers: environment variable AMIWORKER_SERVERS is not valid JSON: "
    )
    assert "\n" not in message and SECRET not in message


def test_env_servers_wrong_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIWORKER_SERVERS", json.dumps({"name": "pbx1", "secret": SECRET}))
    message = load_error()
    assert message == "invalid setting servers: Input should be a valid list"


def test_secret_with_wrong_type_is_not_echoed() -> None:
    message = load_error(servers=[server(secret=12345678)])
    assert message == "invalid setting servers.0.secret: Input should be a valid string"


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert load_error(config_file=missing) == f"config file {missing} not found"


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    message = load_error(config_file=tmp_path)
    assert message.startswith(f"config file {tmp_path} cannot be read: ")
    assert "\n" not in message


def test_toml_syntax_error(tmp_path: Path) -> None:
    toml = write(tmp_path / "bad.toml", f'workers = 2\nsecret = "{SECRET}\n')
    message = load_error(config_file=toml)
    assert message.startswith(f"config file {toml} is not valid TOML: ")
    assert "line 2" in message
    assert "\n" not in message and SECRET not in message


def test_toml_unknown_key_is_refused(tmp_path: Path) -> None:
    toml = write(tmp_path / "typo.toml", "worker = 2\n")
    assert load_error(config_file=toml) == f"unknown setting 'worker' in config file {toml}"


def test_toml_wrong_type(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'batch_delay = "soon"\n')
    assert load_error(config_file=toml).startswith(
        "invalid setting batch_delay: Input should be a valid number"
    )


def test_unknown_flag_is_refused() -> None:
    assert load_error(wrokers=3) == "unknown setting 'wrokers'"


def test_require_servers() -> None:
    with pytest.raises(SettingsError, match="no PBX configured"):
        Settings.load().require_servers()
    Settings.load(servers=[server()]).require_servers()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017"),
        ("mongodb://app@h1/?authSource=admin", "mongodb://app@h1/?authSource=admin"),
        (
            f"mongodb://app:{PASSWORD}@h1,h2/db?replicaSet=rs",
            "mongodb://app:***@h1,h2/db?replicaSet=rs",
        ),
        (
            f"mongodb+srv://app:{PASSWORD}@cluster.example.net",
            "mongodb+srv://app:***@cluster.example.net",
        ),
        (f"mongodb://app:p@ss{PASSWORD}@h1/", "mongodb://app:***@h1/"),
        (
            f"mongodb://h1/?tls=true&tlsCertificateKeyFilePassword={PASSWORD}&w=majority",
            "mongodb://h1/?tls=true&tlsCertificateKeyFilePassword=***&w=majority",
        ),
        (f"app:{PASSWORD}@h1", "app:***@h1"),
    ],
)
def test_redact_uri(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_secrets_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMIWORKER_SERVERS", json.dumps([server()]))
    monkeypatch.setenv("AMIWORKER_MONGO_URI", f"mongodb://app:{PASSWORD}@db1/")
    settings = Settings.load()

    printed = [
        repr(settings),
        str(settings),
        repr(settings.servers[0]),
        str(settings.servers[0]),
        json.dumps(settings.redacted()),
        settings.describe(),
    ]
    for text in printed:
        assert SECRET not in text
        assert PASSWORD not in text
    redacted = settings.redacted()
    assert redacted["mongo_uri"] == "mongodb://app:***@db1/"
    assert redacted["servers"][0]["secret"] == "***"
    assert redacted["servers"][0]["host"] == "10.0.0.5"
    assert 'mongo_uri = "mongodb://app:***@db1/"' in settings.describe()
    # the real values are still there for the code that needs them
    assert settings.servers[0].secret.get_secret_value() == SECRET
    assert PASSWORD in settings.mongo_uri


def test_bad_uri_error_masks_password() -> None:
    message = load_error(mongo_uri=f"postgres://app:{PASSWORD}@db1/")
    assert PASSWORD not in message
    assert "postgres://app:***@db1/" in message


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        # pymongo names no option from a URI: the settings do (names are no secret)
        ("mongodb://db1/?replicaSet=rs&bogusOpt=1", "unknown option bogusOpt. Did you mean"),
        ("mongodb://db1/?j=true", "unknown option j. Did you mean one of (journal)"),
        ("mongodb://db1/?tls=maybe", "tls must be 'true' or 'false'"),
    ],
)
def test_a_uri_the_driver_refuses_is_a_settings_error_with_its_reason(
    uri: str, reason: str
) -> None:
    message = load_error(mongo_uri=uri)
    assert message.startswith("invalid setting mongo_uri: is not a valid MongoDB URI (")
    assert reason in message


def test_a_uri_error_whose_reason_would_quote_the_password_leaves_it_out() -> None:
    # pymongo's reason here: "The value of maxpoolsize must be an integer"
    message = load_error(mongo_uri="mongodb://app:integer@db1/?maxPoolSize=many")
    assert "integer" not in message
    assert "(the reason would quote the password)" in message
    assert "mongodb://app:***@db1/?maxPoolSize=many" in message


def test_a_secret_with_a_line_break_is_refused_without_being_echoed() -> None:
    """It would end the login's header; refused once at start-up (exit 2), not by a
    worker retrying the login forever."""
    server = {"name": "pbx1", "host": "h", "username": "u", "secret": "Top\r\nAction: Logoff"}
    message = load_error(servers=[server])
    assert message.startswith("invalid setting servers.0.secret: must not contain a line break")
    assert "Logoff" not in message and "Top" not in message
