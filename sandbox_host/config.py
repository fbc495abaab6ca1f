"""The host's view of `settings.sandbox_host`, resolved once at startup."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from genloop.settings import ConfigError, Settings
from sandbox_host.isolation import Limits, host_mode

# The envd version the host claims, the newest whose every SDK gate (e2b/envd/versions.py) it
# implements: octet-stream uploads (0.5.7), file metadata (0.6.2), entry info in watch events (0.6.3)
# and allow_network_mounts (0.6.4).
ENVD_VERSION = "0.6.4"
TEMPLATE_ALIAS = "base"


@dataclass(frozen=True)
class HostConfig:
    host: str
    port: int
    state_dir: Path
    api_key: str | None  # None until `with_api_key()`: then the configured or the generated key
    key_file: Path
    public_hosts: tuple[str, ...]
    preview_domain: str  # `name[:port]` previews are reached under (`{port}-{id}.{preview_domain}`)
    default_timeout_s: int
    max_timeout_s: int
    max_sandboxes: int
    limits: Limits
    max_upload_bytes: int
    max_egress_connections: int
    max_preview_connections: int
    egress_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    isolated: bool
    mode: str  # isolation.PER_UID, ROOTLESS or UNSAFE
    host_id: str = ""  # "" until `with_host_id()`: then the configured or the generated id

    @classmethod
    def from_settings(cls, settings: Settings) -> HostConfig:
        section = settings.sandbox_host
        return cls(
            host=section.host,
            port=section.port,
            state_dir=settings.resolve(section.state_dir).resolve(),
            api_key=section.api_key.get_secret_value() or None,
            key_file=settings.sandbox_host_key_file,
            public_hosts=tuple(section.public_hosts),
            preview_domain=section.preview_domain or f"localhost:{section.port}",
            default_timeout_s=section.default_timeout_s,
            max_timeout_s=section.max_timeout_s,
            max_sandboxes=section.max_sandboxes,
            limits=Limits(
                memory_mb=section.memory_limit_mb,
                max_processes=section.max_processes,
                max_file_size_mb=section.max_file_size_mb,
                disk_mb=section.disk_limit_mb,
            ),
            max_upload_bytes=section.max_upload_mb * 1024 * 1024,
            max_egress_connections=section.max_egress_connections,
            max_preview_connections=section.max_preview_connections,
            egress_allowed_networks=tuple(
                ipaddress.ip_network(n, strict=False) for n in section.egress_allowed_networks
            ),
            isolated=not section.unsafe_no_isolation,
            mode=host_mode(not section.unsafe_no_isolation),
            host_id=section.host_id,
        )

    def with_api_key(self) -> HostConfig:
        """The control plane always requires a key: the configured one, else the generated one."""
        if self.api_key:
            return self
        return dataclasses.replace(self, api_key=load_or_create_key(self.key_file))

    def with_host_id(self) -> HostConfig:
        """The host's stable id: the configured one, else the one generated once into state_dir."""
        if self.host_id:
            return self
        return dataclasses.replace(self, host_id=load_or_create_host_id(self.state_dir / HOST_ID_FILE))


HOST_ID_FILE = "host-id"


def load_or_create_host_id(path: Path) -> str:
    """The id in `path`, written there first (atomically) when the file does not exist: "h-" and 12
    lowercase letters and digits, safe in a Temporal task queue name."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    _create_once(path, "h-" + "".join(secrets.choice(alphabet) for _ in range(12)), 0o644)
    host_id = path.read_text().strip()
    if not host_id:
        raise ConfigError(f"{path} is empty: delete it and restart the sandbox host to generate a new id")
    return host_id


def _create_once(path: Path, content: str, mode: int) -> None:
    """Write `content` to `path` unless it exists, atomically: the first of racing processes wins
    and the others read its file."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content + "\n")
    try:
        os.link(tmp, path)  # fails if another process won the race: use its file
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def load_or_create_key(path: Path) -> str:
    """The key in `path`, written there first (0600, atomically) when the file does not exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _create_once(path, secrets.token_urlsafe(32), 0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise ConfigError(f"{path} must be a regular file readable by its owner only: chmod 600 {path}")
        key = f.read().strip()
    if not key:
        raise ConfigError(f"{path} is empty: delete it and restart the sandbox host to generate a new key")
    return key
