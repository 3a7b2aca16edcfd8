"""The agent's settings: a config file (YAML, TOML or JSON) overridden by ``TANDEM_AGENT_*`` env vars.

Relative paths in a config file (``data_dir``, ``trusted_keys``) are relative to the file, so a device
directory with its config, key and data can be moved as a unit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tandem.shared.bundle import NAME_PATTERN
from tandem.shared.errors import InvalidInput
from tandem.shared.profile import DriftSettings

ENV_PREFIX = "TANDEM_AGENT_"
DEFAULT_PORT = 8765
SOCKET_NAME = "agent.sock"


Policy = Literal["edge-only", "cloud-only", "constrained", "cascade", "hedged"]

#: ``package.module:function`` — where an app's confidence function lives (importable by the agent).
_CONFIDENCE_REF = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


class TrackedModel(BaseModel):
    """A model the agent keeps installed: ``version`` is ``"latest"`` or a pinned version.

    ``policy`` overrides the agent's policy for this model. ``confidence`` names the function the
    cascade scores the edge's answers with (``package.module:function``; it takes a dict of edge
    outputs, name -> array, and returns a confidence per row): a bundle whose calibration says its
    confidence is ``custom`` needs one to run under the cascade."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str = "latest"
    policy: Policy | None = None
    confidence: str | None = None

    @field_validator("confidence")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is not None and not _CONFIDENCE_REF.fullmatch(v):
            raise ValueError(f"{v!r} is not a function reference: expected package.module:function")
        return v

    @field_validator("name", "version")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # Both become directory names under data_dir and parts of registry URLs.
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(f"{v!r} is not a valid model name or version: it must match {NAME_PATTERN}")
        return v


class AgentMonitoring(DriftSettings):
    """Drift and live quality of what this device serves (see docs/monitoring.md)."""

    #: How often profiles are updated and monitor.json rewritten (when something changed), seconds.
    interval_s: float = Field(2.0, gt=0)
    #: How often a "profile" record goes to the outbox (when something changed), seconds.
    upload_interval_s: float = Field(300.0, gt=0)


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    #: The cloud tier (registry, feedback, inference). None: offline device, serve what is installed.
    cloud_url: str | None = None
    api_key: str | None = None
    models: list[TrackedModel] = Field(default_factory=list)
    #: Public keys whose signatures are trusted; at least one is needed to install anything.
    trusted_keys: list[Path] = Field(default_factory=list)
    data_dir: Path = Path(".tandem/agent")
    poll_interval_s: float = Field(30.0, gt=0)
    #: Installed versions kept on disk (the active one included) for rollback.
    keep_versions: int = Field(3, ge=1)

    # Local API.
    host: str = "127.0.0.1"
    #: TCP port of the local API; 0 picks a free one (written to DATA/agent.json).
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    #: Also listen on DATA/agent.sock.
    unix_socket: bool = True
    #: Binding to anything but loopback must be asked for explicitly.
    allow_remote: bool = False
    #: When set, every local API call but /v2/health/* must carry it, as ``Authorization: Bearer <token>``
    #: or ``X-Tandem-Token: <token>``: other local users and programs then cannot use the agent.
    #: Better set through TANDEM_AGENT_LOCAL_TOKEN than in a file others can read.
    local_token: str | None = Field(None, min_length=16)
    max_request_bytes: int = Field(64 << 20, gt=0)
    #: Seconds an app may take to send a request body; then it gets 408 (an app that stalls
    #: mid-body would otherwise hold its handler until the agent stops).
    read_timeout_s: float = Field(60.0, gt=0)

    # Router.
    policy: Policy = "cascade"
    #: onnxruntime intra-op threads per local session (2-core devices: 1 leaves a core for I/O).
    intra_op_threads: int = Field(1, ge=1)
    #: Extra keyword arguments for the router (HybridClient ``config``), passed through unchanged.
    router: dict[str, Any] = Field(default_factory=dict)

    # Outbox (store-and-forward).
    outbox_max_rows: int = Field(100_000, ge=1)
    outbox_max_age_s: float = Field(7 * 86400.0, gt=0)
    upload_batch: int = Field(200, ge=1)
    upload_interval_s: float = Field(5.0, gt=0)
    #: Longest wait between upload retries while the cloud is down (doubling from upload_interval_s).
    upload_max_backoff_s: float = Field(60.0, gt=0)
    telemetry_interval_s: float = Field(60.0, gt=0)
    #: Record every routed call in the outbox (kind "route").
    record_routes: bool = True
    monitoring: AgentMonitoring = Field(default_factory=AgentMonitoring)

    @field_validator("cloud_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"cloud_url {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> AgentConfig:
        if not self.allow_remote and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address; the local API is for apps on this device. "
                "Set allow_remote: true to expose it on the network knowingly."
            )
        return self

    def tracked(self, name: str) -> TrackedModel | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def socket_path(self) -> Path:
        return self.data_dir / SOCKET_NAME


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML/TOML/JSON file, with relative paths resolved against the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InvalidInput(f"agent config file {p} does not exist") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InvalidInput(f"{p} is YAML but PyYAML is not installed: pip install PyYAML, or use TOML/JSON") from None
            data = yaml.safe_load(text) or {}
        else:
            raise InvalidInput(f"{p}: config files must end in .yaml, .yml, .toml or .json")
    except InvalidInput:
        raise
    except Exception as e:  # each parser has its own error type; all mean the same here
        raise InvalidInput(f"{p} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{p} must hold a mapping of settings")
    base = p.resolve().parent
    if "data_dir" in data and isinstance(data["data_dir"], str):
        data["data_dir"] = str(base / data["data_dir"])
    if isinstance(data.get("trusted_keys"), str):
        data["trusted_keys"] = [data["trusted_keys"]]
    if isinstance(data.get("trusted_keys"), list):
        data["trusted_keys"] = [str(base / k) if isinstance(k, str) else k for k in data["trusted_keys"]]
    return data


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> AgentConfig:
    """Settings from ``overrides`` > ``TANDEM_AGENT_*`` env vars > the config file > defaults."""
    file_data = read_config_file(path) if path else {}

    class _WithFile(AgentConfig):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[Any, ...]:
            return (init_settings, env_settings, lambda: file_data)

    try:
        cfg = _WithFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        where = f" in {path}" if path else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise InvalidInput(f"agent config{where}: {loc + ': ' if loc else ''}{msg}") from None
    return AgentConfig.model_construct(**cfg.__dict__)
