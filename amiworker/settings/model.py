"""Settings: one pydantic-settings model, read from four places.

Highest precedence first:

1. keyword arguments to :meth:`Settings.load` (the CLI passes its flags here),
2. ``AMIWORKER_*`` environment variables,
3. a ``.env`` file (same names as the environment variables),
4. an optional TOML file (``--config``), top-level keys named like the fields,
   ``[[servers]]`` tables for the PBXs.

Anything a user can get wrong becomes a :class:`SettingsError` whose message
has one line per problem, naming the setting and what is wrong with it, and
never the value of a secret (AMI secrets, the MongoDB password).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from amiworker.settings.errors import (
    ENV_PREFIX,
    SettingsError,
    check_config_file,
    format_source_error,
    format_validation_error,
)
from amiworker.settings.redact import MASK, redact_uri, uri_secrets

__all__ = ["ServerSettings", "Settings", "database_name_problem", "default_spill_dir"]

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def default_spill_dir() -> Path:
    """``$XDG_STATE_HOME/amiworker/spill``: state that must survive a restart."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "amiworker" / "spill"


class ServerSettings(BaseModel):
    """One PBX to hold an AMI session with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=100)] = Field(
        description="Short unique name of this PBX; stored in every event document "
        "and part of the dedup key, so keep it stable."
    )
    host: Annotated[str, Field(min_length=1)] = Field(description="AMI host name or address.")
    port: int = Field(default=5038, ge=1, le=65535, description="AMI TCP port.")
    username: Annotated[str, Field(min_length=1)] = Field(
        description="AMI user (manager.conf section); every worker must use the same one."
    )
    secret: SecretStr = Field(description="AMI secret; never logged or printed.")
    auth: Literal["md5", "plain"] = Field(
        default="md5",
        description="Login with an MD5 challenge (secret never sent) or in plain text.",
    )
    events: Annotated[str, Field(min_length=1)] = Field(
        default="on",
        description="Value of the Login action's Events header: on, off, or a class list "
        "such as 'call,system'.",
    )
    tls: bool = Field(default=False, description="Connect with TLS (Asterisk's tlsbindport).")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle used to verify the PBX certificate when tls is on."
    )

    @field_validator("name", "host", "username", "events", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("events", "username")
    @classmethod
    def _single_line(cls, value: str) -> str:
        # These go into AMI headers: a CR or LF would inject headers.
        if "\r" in value or "\n" in value:
            raise ValueError("must not contain a line break")
        return value

    @field_validator("secret")
    @classmethod
    def _secret_single_line(cls, value: SecretStr) -> SecretStr:
        # Sent in a header too (plain login): refused here, once, rather than by
        # every login attempt of a worker that would retry it forever.
        text = value.get_secret_value()
        if "\r" in text or "\n" in text:
            raise ValueError("must not contain a line break (AMI would read the rest as headers)")
        return value

    @field_validator("tls_ca_file")
    @classmethod
    def _ca_needs_tls(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and not info.data.get("tls", False):
            raise ValueError("is set but tls is false; set tls = true or remove it")
        return value


# The TOML file of the current Settings.load() call. pydantic-settings builds its
# sources in a classmethod, so the path reaches it through a context variable.
_toml_file: ContextVar[Path | None] = ContextVar("amiworker_toml_file", default=None)


# Characters MongoDB refuses in a database name wherever it runs (on Windows also
# *<>:|?, which a server on Linux takes: left to it).
_DATABASE_NAME_REFUSES: Final = frozenset('/\\. "$\0')


def database_name_problem(name: str) -> str | None:
    """Why MongoDB would refuse ``name`` for a database (None: it would not)."""
    refused = sorted({c for c in name if c in _DATABASE_NAME_REFUSES})
    if refused:
        shown = " ".join(repr(c) for c in refused)
        return f"a MongoDB database name cannot contain {shown}"
    if not 0 < len(name.encode()) < 64:
        return "a MongoDB database name is 1 to 63 bytes long"
    return None


def _unknown_uri_options(uri: str) -> list[str]:
    """The option names of ``uri`` this pymongo does not know (as written)."""
    try:
        from pymongo.common import URI_OPTIONS_ALIAS_MAP, URI_OPTIONS_VALIDATOR_MAP
    except ImportError:  # moved in some pymongo: the option goes unnamed
        return []
    hosts_on = uri.partition("://")[2].rpartition("@")[2]  # past the user info, whatever it holds
    query = hosts_on.partition("?")[2].partition("#")[0]
    names = [pair.partition("=")[0] for pair in re.split("[&;]", query) if pair]
    known = URI_OPTIONS_VALIDATOR_MAP.keys() | URI_OPTIONS_ALIAS_MAP.keys()
    return [name for name in names if name.lower() not in known]


class Settings(BaseSettings):
    """Every setting of amiworker; see the module docstring for where they come from."""

    # extra="ignore": a .env file is often shared with other tools. Unknown keys
    # in the TOML file and unknown flags are refused by load() instead.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    servers: list[ServerSettings] = Field(
        default_factory=list,
        description="The PBXs; every worker connects to all of them. From the environment "
        'as JSON: AMIWORKER_SERVERS=\'[{"name":"pbx1","host":"10.0.0.5",...}]\'.',
    )
    mongo_uri: str = Field(
        default="mongodb://127.0.0.1:27017",
        description="MongoDB connection string (a replica set in production). May hold a "
        "password; it is masked whenever printed.",
    )
    database: Annotated[str, Field(min_length=1, max_length=63)] = Field(
        default="amiworker", description="MongoDB database name."
    )
    collection: Annotated[str, Field(min_length=1)] = Field(
        default="events", description="Collection holding the event log."
    )
    driver: Literal["pymongo", "motor"] = Field(
        default="pymongo",
        description="MongoDB driver: PyMongo's asyncio client, or Motor (deprecated) for "
        "handlers that already share a Motor client.",
    )
    workers: int = Field(default=1, ge=1, le=1024, description="Number of worker processes.")
    handlers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["handlers"],
        description="Handler modules to import, in order. From the environment either "
        "comma-separated (handlers,billing) or a JSON list.",
    )
    app_dir: Path = Field(
        default=Path("."),
        description="Directory put first on sys.path to import handler modules.",
    )
    race: Literal["channel", "all", "none"] = Field(
        default="channel",
        description="Which events race through MongoDB: those of a channel (carrying a "
        "*Uniqueid header), all, or none (every worker handles every event).",
    )
    claim_mode: Literal["race", "hedged"] = Field(
        default="race",
        description="race: every worker inserts every raced event, the first insert wins "
        "(the documented pattern). hedged: each event's owner inserts it, the others "
        "insert only what its owner has not covered after hedge_delay (one insert per "
        "event, the same redundancy).",
    )
    hedge_delay: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="hedged: seconds a standby waits for an event's owner to claim it "
        "before claiming it itself (times its standby rank).",
    )
    hedge_window: int = Field(
        default=50_000,
        ge=100,
        le=10_000_000,
        description="hedged: events a standby keeps while their owners claim them; a full "
        "window claims its oldest events itself (as race mode), never drops them.",
    )
    batch_size: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Most events per claim (insert_many). Keep it below handler_backlog: "
        "what a batch wins beyond the backlog's room is stored queued, for a second trip.",
    )
    batch_delay: float = Field(
        default=0.0,
        ge=0,
        le=10,
        description="Seconds the oldest waiting event may wait for a claim batch to fill "
        "(events arriving during a claim join the next batch anyway).",
    )
    handler_concurrency: int = Field(
        default=64, ge=1, description="Handlers running at once per worker."
    )
    handler_backlog: int = Field(
        default=2000,
        ge=1,
        le=1_000_000,
        description="Events a worker holds for its handlers (queued or running). What it "
        "wins beyond nine tenths of that is stored 'queued', for any worker with room to "
        "take; the last tenth is kept for events every worker handles (never stored).",
    )
    handler_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a handler may run before it counts as failed."
    )
    max_attempts: int = Field(
        default=5, ge=1, le=100, description="Runs of a failing handler before its event is dead."
    )
    retry_backoff: float = Field(
        default=1.0,
        ge=0,
        le=86400,
        description="Seconds before the first retry; doubles with every further attempt.",
    )
    retry_backoff_max: float = Field(
        default=3600.0,
        ge=0,
        le=7 * 86400,
        description="Longest delay between two runs of a failing handler, in seconds.",
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, description="Seconds between a worker's heartbeats."
    )
    lease: float = Field(
        default=10.0,
        gt=0,
        description="Seconds without a heartbeat after which a worker counts as dead and "
        "its claimed events are taken over. Must exceed 2 * heartbeat_interval.",
    )
    ack_delay: float = Field(
        default=0.2,
        ge=0,
        le=10,
        description="Seconds within which a finished handler's event is marked done (acks "
        "are batched within this window; a killed worker re-runs what finished in it).",
    )
    store_timeout: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Deadline of every MongoDB call (client timeoutMS, and wtimeout of the "
        "majority write concern): a store that does not answer within it is an outage.",
    )
    allow_no_timestamps: bool = Field(
        default=False,
        description="Let `amiworker check` pass for a PBX whose events carry no Timestamp "
        "(timestampevents=no), where a repeated identical event may be missed.",
    )
    buffer_size: int = Field(
        default=100_000,
        ge=1,
        description="Events waiting for their claim held in memory (a burst, MongoDB slow "
        "or away); beyond it they spill to disk (spill_dir).",
    )
    spill_dir: Path = Field(
        default_factory=lambda: default_spill_dir(),
        description="Where events beyond buffer_size wait on local disk, one directory per "
        "worker slot; created if missing. Default $XDG_STATE_HOME/amiworker/spill "
        "(~/.local/state/amiworker/spill).",
    )
    spill_max_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Most bytes a worker's spill holds; past it events are dropped, counted "
        "and logged. 0: no spill (past buffer_size, events are dropped).",
    )
    reconnect_min: float = Field(
        default=0.5, gt=0, description="First AMI reconnect delay in seconds."
    )
    reconnect_max: float = Field(
        default=30.0, gt=0, description="Largest AMI reconnect delay in seconds."
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to connect and log in to a PBX."
    )
    action_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to wait for the response to an AMI action."
    )
    ping_interval: float = Field(
        default=10.0, gt=0, description="Seconds between keepalive Pings on an idle session."
    )
    ping_timeout: float = Field(
        default=5.0, gt=0, description="Seconds without a Ping reply before the session is dead."
    )
    max_message_size: int = Field(
        default=1_048_576, ge=1024, description="Largest AMI message accepted, in bytes."
    )
    dedup_window: float = Field(
        default=10.0,
        ge=0,
        description="Seconds within which byte-identical events of one PBX are told apart "
        "by their occurrence number (see the dedup key in ARCHITECTURE.md).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve metrics on this port; off when unset."
    )
    ttl_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete events this many days after they were received (TTL index); "
        "keep forever when unset.",
    )
    shutdown_timeout: float = Field(
        default=10.0, ge=0, description="Seconds running handlers get to finish on stop."
    )

    # -- the call board
    board_token: SecretStr | None = Field(
        default=None,
        description="Token the call board's Retry action requires (Authorization: Bearer); "
        "required to bind `amiworker board` to a non-loopback address. Never printed.",
    )
    board_call_max_age: float = Field(
        default=14400.0,
        gt=0,
        le=30 * 86400,
        description="Seconds a call stays on the call board without its Hangup: a Hangup "
        "missed while no worker was connected cannot leave a call there for longer (longer "
        "calls leave the board too; the log keeps them).",
    )

    # -- validation -------------------------------------------------------

    @field_validator("servers")
    @classmethod
    def _unique_server_names(cls, servers: list[ServerSettings]) -> list[ServerSettings]:
        seen: set[str] = set()
        for server in servers:
            if server.name in seen:
                raise ValueError(f"server name {server.name!r} is used twice; names must be unique")
            seen.add(server.name)
        return servers

    @field_validator("database")
    @classmethod
    def _database_name(cls, name: str) -> str:
        problem = database_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        return name

    @field_validator("mongo_uri")
    @classmethod
    def _mongo_scheme(cls, uri: str) -> str:
        uri = uri.strip()
        if not uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("must start with mongodb:// or mongodb+srv://")
        if uri.startswith("mongodb://"):
            # Parsed now, so a malformed URI (or an unknown option) is a settings error
            # (exit 2) rather than a driver error later. pymongo's reason is repeated
            # only if it quotes no secret: it can quote pieces of an unescaped password.
            from pymongo.errors import ConfigurationError, InvalidURI
            from pymongo.uri_parser import parse_uri

            try:
                parse_uri(uri, validate=True)
            except (InvalidURI, ConfigurationError, ValueError) as exc:
                reason = str(exc)
                if not reason or any(secret in reason for secret in uri_secrets(uri)):
                    reason = "the reason would quote the password"
                unknown = _unknown_uri_options(uri)
                if unknown and reason.startswith("Unknown option."):
                    # pymongo does not name an option from a URI; option names are no secret.
                    reason = f"unknown option {', '.join(unknown)}{reason[len('Unknown option') :]}"
                reason = reason.removesuffix(" Refer to docstring.")
                raise ValueError(
                    f"is not a valid MongoDB URI ({reason}); check its hosts and options, and "
                    "percent-encode @ : / ? # [ ] % in the user name and password (RFC 3986)"
                ) from None
        return uri

    @field_validator("handlers", mode="before")
    @classmethod
    def _split_handlers(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"is not a valid JSON list ({exc.msg})") from None
            return [part for part in text.split(",")]
        return value

    @field_validator("handlers")
    @classmethod
    def _module_names(cls, names: list[str]) -> list[str]:
        cleaned = [name.strip() for name in names if name.strip()]
        for name in cleaned:
            if not _MODULE_NAME.match(name):
                raise ValueError(f"{name!r} is not a Python module name")
        return cleaned

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("lease")
    @classmethod
    def _lease_covers_heartbeats(cls, lease: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval")
        if interval is not None and lease <= 2 * interval:
            raise ValueError(
                f"must exceed 2 * heartbeat_interval ({2 * interval:g}s), or live workers "
                "would be taken for dead"
            )
        return lease

    @field_validator("reconnect_max")
    @classmethod
    def _max_above_min(cls, maximum: float, info: ValidationInfo) -> float:
        minimum = info.data.get("reconnect_min")
        if minimum is not None and maximum < minimum:
            raise ValueError(f"must be at least reconnect_min ({minimum:g})")
        return maximum

    # -- sources ------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_file = _toml_file.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def load(
        cls,
        config_file: Path | str | None = None,
        *,
        env_file: Path | str | None = ".env",
        **overrides: Any,
    ) -> Settings:
        """Build the settings from every source, or raise :class:`SettingsError`.

        ``overrides`` are the CLI flags (highest precedence); ``None`` values are
        dropped so an unset flag falls through to the other sources. ``env_file``
        is the ``.env`` path (relative to the current directory), ``None`` for none.
        """
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise SettingsError("\n".join(f"unknown setting {name!r}" for name in unknown))
        flags = {name: value for name, value in overrides.items() if value is not None}
        toml_path = (
            check_config_file(Path(config_file), set(cls.model_fields))
            if config_file is not None
            else None
        )
        token = _toml_file.set(toml_path)
        try:
            # _env_file is a BaseSettings init option mypy cannot see through pydantic.
            init_kwargs: dict[str, Any] = {"_env_file": env_file, **flags}
            return cls(**init_kwargs)
        except ValidationError as exc:
            raise SettingsError(format_validation_error(exc)) from None
        except PydanticSettingsError as exc:
            raise SettingsError(format_source_error(exc)) from None
        finally:
            _toml_file.reset(token)

    def require_servers(self) -> None:
        """Raise :class:`SettingsError` unless at least one PBX is configured."""
        if not self.servers:
            raise SettingsError(
                "no PBX configured: set AMIWORKER_SERVERS (JSON list) or add [[servers]] "
                "tables to the config file"
            )

    # -- printing -------------------------------------------------------------

    def redacted(self) -> dict[str, Any]:
        """All settings as JSON-friendly data, secrets and the URI password masked."""
        data = self.model_dump(mode="json")
        data["mongo_uri"] = redact_uri(self.mongo_uri)
        for server in data["servers"]:
            server["secret"] = MASK
        return data

    def describe(self) -> str:
        """The settings as ``name = value`` lines, for ``amiworker config``."""
        lines = []
        for name, value in self.redacted().items():
            lines.append(f"{name} = {json.dumps(value)}")
        return "\n".join(lines)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # The default repr would print mongo_uri, password included.
        for name, value in super().__repr_args__():
            yield name, redact_uri(value) if name == "mongo_uri" else value
