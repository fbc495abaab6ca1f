"""The one settings object: temporal-dev.yaml, overridden by environment variables.

Lookup order for a key: a standard variable where one exists (TEMPORAL_ADDRESS, E2B_API_KEY, ...),
then GENLOOP_<SECTION>_<KEY>, then the YAML file (GENLOOP_CONFIG, default: temporal-dev.yaml at the
repository root), then the defaults below. Bad values raise ConfigError with the offending key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from genloop.http import is_loopback_name

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "temporal-dev.yaml"


class ConfigError(ValueError):
    """Invalid configuration: the message names the key and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemporalSettings(_Section):
    ip: str = "127.0.0.1"
    port: int = Field(7233, ge=1, le=65535)
    ui_port: int = Field(8233, ge=1, le=65535)
    namespace: str = "default"
    address: str = ""  # TEMPORAL_ADDRESS; empty: ip:port of the local dev server
    db_file: str = "temporal.db"
    sqlite_pragmas: dict[str, str] = Field(default_factory=lambda: {"journal_mode": "wal", "synchronous": "normal"})
    search_attributes: dict[str, Literal["keyword", "text", "int", "double", "bool", "datetime"]] = Field(
        default_factory=lambda: {"BuildStage": "keyword", "ProjectId": "keyword", "BuildVersion": "keyword"}
    )
    dynamic_config: dict[str, int | float | bool | str] = Field(default_factory=dict)
    task_queue: str = "genloop-builds"
    ui_url: str = ""  # the Web UI of a remote cluster / Temporal Cloud; empty: the local dev server's

    @property
    def target(self) -> str:
        return self.address or f"{self.ip}:{self.port}"

    @property
    def web_ui_url(self) -> str:
        return (self.ui_url or f"http://{self.ip}:{self.ui_port}").rstrip("/")

    def dev_server_args(self, *, file_backed: bool = True) -> list[str]:
        """Flags for `temporal server start-dev` that every local server (stack, tests, bench) shares.
        The SQLite pragmas only apply to a file-backed server."""
        import json

        args: list[str] = []
        for key, value in self.sqlite_pragmas.items() if file_backed else ():
            args += ["--sqlite-pragma", f"{key}={value}"]
        for key, value in self.dynamic_config.items():
            args += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
        return args

    def workflow_url(self, workflow_id: str, run_id: str | None = None) -> str:
        """The Web UI page of one workflow run (the latest run without run_id)."""
        from urllib.parse import quote

        path = f"{self.web_ui_url}/namespaces/{quote(self.namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"
        return f"{path}/{quote(run_id, safe='')}/history" if run_id else path


class WorkerSettings(_Section):
    max_concurrent_activities: int = Field(200, ge=1)
    max_concurrent_local_activities: int = Field(200, ge=1)
    # Workflow tasks only interleave on the one event loop: more at once only stretches each (the
    # first one holds the start write), past the SDK's 5 s warning at 100 builds at once (bench overhead).
    max_concurrent_workflow_tasks: int = Field(10, ge=2)
    # A workflow task waits this long on the queue of the worker that ran the workflow last (its
    # sticky cache) before any worker may take it. The SDK's 10 s is how long a build stood still
    # after its worker's machine died (bench hosts).
    sticky_schedule_to_start_s: float = Field(3, gt=0)
    sweep_interval_s: float = Field(300, ge=0)


class DatabaseSettings(_Section):
    url: str = ""


class SandboxSettings(_Section):
    api_url: str = ""
    api_key: SecretStr = SecretStr("")
    template: str = "base"
    timeout_s: int = Field(3600, ge=1)
    app_port: int = Field(8080, ge=1, le=65535)


class SandboxHostSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(49983, ge=1, le=65535)
    state_dir: str = "sandboxes"
    # Empty: the host generates one at first start into data_dir/sandbox-host.key (0600).
    api_key: SecretStr = SecretStr("")
    # Host header names served besides loopback ones and *.localhost (DNS-rebinding protection).
    public_hosts: list[str] = Field(default_factory=list)
    # Where other machines reach this host's previews, `name[:port]`: a sandbox's port is then
    # `{port}-{sandbox id}.{preview_domain}` (needs wildcard DNS). Empty: `localhost:{port}`, this machine only.
    preview_domain: str = ""
    default_timeout_s: int = Field(300, ge=1)
    max_timeout_s: int = Field(86400, ge=1)
    max_sandboxes: int = Field(200, ge=1)
    memory_limit_mb: int = Field(1024, ge=16)
    max_processes: int = Field(256, ge=8)
    max_file_size_mb: int = Field(512, ge=1)
    disk_limit_mb: int = Field(1024, ge=16)
    max_upload_mb: int = Field(100, ge=1)
    unsafe_no_isolation: bool = False
    # Per sandbox: concurrent egress (CONNECT) connections, and concurrent preview connections.
    max_egress_connections: int = Field(256, ge=1)
    max_preview_connections: int = Field(512, ge=1)
    # CIDRs sandboxes may reach although egress denies them (a package mirror on the LAN); never loopback.
    egress_allowed_networks: list[str] = Field(default_factory=list)
    # The host's stable id (GET /health, the worker's `<task_queue>@<host_id>`); empty: generated once
    # into state_dir/host-id and kept across restarts.
    host_id: str = ""

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise PydanticCustomError(
                "host_id", "{value} is not a host id: use 1-63 letters, digits, '.', '_' or '-'",
                {"value": repr(value)},
            )
        return value

    @field_validator("egress_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _network_bind_needs_a_key(self) -> SandboxHostSettings:
        # A generated key lives in a file on this machine: callers elsewhere could not have it.
        if not is_loopback_name(self.host) and not self.api_key.get_secret_value():
            raise PydanticCustomError(
                "insecure_bind",
                "sandbox_host.host={host} is not a loopback address and sandbox_host.api_key is not set: "
                "set GENLOOP_SANDBOX_HOST_API_KEY or bind 127.0.0.1",
                {"host": repr(self.host)},
            )
        return self


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: SecretStr = SecretStr("")
    max_body_bytes: int = Field(65536, ge=1024)  # bytes of a JSON body (cancel, goals, changes without edits)
    max_edit_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # bytes of a build request that carries file edits
    # Host names (besides loopback ones) the API answers to, e.g. "genloop.example.com"; any other
    # Host header is refused (421), which defeats DNS rebinding.
    public_hosts: list[str] = Field(default_factory=list)


class RunnerSettings(_Section):
    kind: Literal["template", "llm"] = "template"  # the default runner of a build that names none
    llm_provider: Literal["openai", "anthropic"] = "openai"  # wire protocol: openai = any OpenAI-compatible server
    llm_base_url: str = ""  # endpoint URL (Ollama: http://127.0.0.1:11434/v1); empty: the provider's own
    llm_model: str = ""  # model name sent to the provider; empty: the provider's default (runners/llm.py)
    llm_api_key: SecretStr = SecretStr("")  # secret; may stay empty for a keyless local endpoint (base URL set)
    llm_timeout_s: float = Field(300, gt=0)  # seconds one model call may take before it fails (transient)
    llm_max_output_tokens: int = Field(16000, ge=256)  # tokens one model response may produce at most
    max_tokens_per_build: int = Field(0, ge=0)  # input + output tokens over all of a build's calls; 0: unlimited
    fix_attempts: int = Field(2, ge=0, le=10)  # fix attempts after a failed DEPS/CHECKS before the build fails

    @property
    def llm_configured(self) -> bool:
        """A key, or an endpoint of our own (a local server needs no key): the LLM runner can be offered."""
        return bool(self.llm_api_key.get_secret_value() or self.llm_base_url)

    @model_validator(mode="after")
    def _llm_needs_an_endpoint(self) -> RunnerSettings:
        if self.kind == "llm" and not self.llm_configured:
            raise ConfigError(
                "runner.kind is 'llm' but no model endpoint is configured: set GENLOOP_RUNNER_LLM_API_KEY "
                "(or GENLOOP_RUNNER_LLM_BASE_URL for a keyless local server)"
            )
        return self


class PreviewSettings(_Section):
    """Every READY version keeps one URL; idle versions pause and wake on their next request."""

    idle_pause_s: float = Field(300, gt=0)  # seconds without a request before a version's sandbox pauses
    wake_hold_s: float = Field(30, gt=0)  # seconds a request waits for its version to wake, then 503 + Retry-After
    keep_awake: int = Field(0, ge=0)  # the newest N READY versions of each project never pause
    retention_days: float = Field(0, ge=0)  # days a version stays served; then its sandbox goes, its URL answers 410
    public_origin: str = ""  # e.g. https://preview.example.com: version URLs become https://<label>.preview.example.com
    # after a version failed to start again, how long it answers 503 before a retry
    retry_failed_s: float = Field(600, gt=0)


class LogSettings(_Section):
    """Build logs: command and app output stored beside the build (a side channel, not Temporal)."""

    cap_bytes: int = Field(2 * 1024 * 1024, ge=4096)  # bytes of log text one build may store; then a truncation line
    retention_days: float = Field(14, ge=0)  # days a build's logs are kept (the sweep deletes older ones); 0: forever
    batch_interval_s: float = Field(0.2, gt=0, le=10)  # seconds an activity buffers lines before it writes them
    batch_bytes: int = Field(64 * 1024, ge=1024)  # bytes buffered that trigger a write before the interval ends


class Settings(_Section):
    data_dir: Path = Path(".genloop")
    temporal: TemporalSettings = TemporalSettings()
    worker: WorkerSettings = WorkerSettings()
    database: DatabaseSettings = DatabaseSettings()
    sandbox: SandboxSettings = SandboxSettings()
    sandbox_host: SandboxHostSettings = SandboxHostSettings()
    api: ApiSettings = ApiSettings()
    runner: RunnerSettings = RunnerSettings()
    preview: PreviewSettings = PreviewSettings()
    logs: LogSettings = LogSettings()

    # --- derived values: one place computes them ---
    def resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (self.data_dir / p)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.resolve('genloop.db').resolve()}"

    def version_url(self, label: str) -> str:
        """The stable URL of a version whose host label is `label` (served by the API's gateway)."""
        origin = self.preview.public_origin.rstrip("/")
        if origin:
            scheme, _, host = origin.partition("://")
            return f"{scheme}://{label}.{host}"
        return f"http://{label}.localhost:{self.api.port}"

    @property
    def sandbox_host_url(self) -> str:
        return f"http://{self.sandbox_host.host}:{self.sandbox_host.port}"

    @property
    def uses_e2b_cloud(self) -> bool:
        return not self.sandbox.api_url and bool(self.sandbox.api_key.get_secret_value())

    @property
    def sandbox_api_url(self) -> str | None:
        """None means the SDK's own default (E2B cloud)."""
        if self.sandbox.api_url:
            return self.sandbox.api_url
        return None if self.uses_e2b_cloud else self.sandbox_host_url

    @property
    def sandbox_host_key_file(self) -> Path:
        """Where the local sandbox host keeps the key it generated when sandbox_host.api_key is unset."""
        return self.resolve("sandbox-host.key")

    @property
    def sandbox_api_key(self) -> str:
        key = self.sandbox.api_key.get_secret_value() or self.sandbox_host.api_key.get_secret_value()
        if key or self.sandbox_api_url != self.sandbox_host_url:
            return key
        try:
            return self.sandbox_host_key_file.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(
                f"no key for the local sandbox host: start it once (genloop up) so it writes "
                f"{self.sandbox_host_key_file}, or set GENLOOP_SANDBOX_HOST_API_KEY"
            ) from None

    @property
    def available_runners(self) -> tuple[str, ...]:
        """The runners this deployment offers, the configured default first."""
        runners = ["template"]
        if self.runner.llm_configured:
            runners.append("llm")
        runners.sort(key=lambda r: r != self.runner.kind)
        return tuple(runners)

    @property
    def api_requires_token(self) -> bool:
        return bool(self.api.token.get_secret_value())

    def check_api_binding(self) -> None:
        if not self.api_requires_token and not is_loopback_name(self.api.host):
            raise ConfigError(
                f"api.host={self.api.host!r} is not a loopback address and GENLOOP_API_TOKEN is not set: "
                "refusing to serve builds to the network without authentication"
            )


# Standard variables (and short aliases) mapped to their settings keys.
_STANDARD_ENV = {
    "TEMPORAL_ADDRESS": ("temporal", "address"),
    "TEMPORAL_NAMESPACE": ("temporal", "namespace"),
    "E2B_API_KEY": ("sandbox", "api_key"),
    "E2B_API_URL": ("sandbox", "api_url"),
    "GENLOOP_API_TOKEN": ("api", "token"),
    "GENLOOP_DATABASE_URL": ("database", "url"),
    "GENLOOP_LLM_API_KEY": ("runner", "llm_api_key"),  # short alias of GENLOOP_RUNNER_LLM_API_KEY
}


def _env_overrides(environ: dict[str, str], raw: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            section = merged.setdefault(name, {})
            for key in annotation.model_fields:
                env = f"GENLOOP_{name}_{key}".upper()
                if env in environ:
                    section[key] = _parse_env(environ[env])
        else:
            env = f"GENLOOP_{name}".upper()
            if env in environ:
                merged[name] = environ[env]
    for env, (section, key) in _STANDARD_ENV.items():
        if environ.get(env):
            merged.setdefault(section, {})[key] = environ[env]
    return merged


def _parse_env(value: str) -> Any:
    # JSON-ish values (mappings for pragmas / search attributes, lists) parse as YAML; scalars stay
    # strings and pydantic coerces them.
    if value.startswith(("{", "[")):
        return yaml.safe_load(value)
    return value


def load_settings(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    path = Path(config_file or environ.get("GENLOOP_CONFIG") or DEFAULT_CONFIG_FILE)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        raw = loaded
    elif config_file or environ.get("GENLOOP_CONFIG"):
        raise ConfigError(f"config file {path} does not exist")
    try:
        settings = Settings.model_validate(_env_overrides(environ, raw))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration ({path}): {problems}") from None
    if not settings.data_dir.is_absolute():
        base = path.parent if path.exists() else Path.cwd()
        settings = settings.model_copy(update={"data_dir": (base / settings.data_dir).resolve()})
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
