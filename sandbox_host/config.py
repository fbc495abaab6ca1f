"""The host's view of `settings.sandbox_host`, resolved once at startup."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from genloop.settings import Settings
from sandbox_host.isolation import Limits

# The envd version the host claims: enables octet-stream uploads (0.5.7) and everything before it,
# but not file metadata (0.6.2) or watch options the agent does not implement.
ENVD_VERSION = "0.5.7"
TEMPLATE_ALIAS = "base"


@dataclass(frozen=True)
class HostConfig:
    host: str
    port: int
    state_dir: Path
    api_key: str | None
    default_timeout_s: int
    max_timeout_s: int
    max_sandboxes: int
    limits: Limits
    max_upload_bytes: int
    max_egress_connections: int
    max_preview_connections: int
    egress_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    isolated: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> HostConfig:
        section = settings.sandbox_host
        return cls(
            host=section.host,
            port=section.port,
            state_dir=settings.resolve(section.state_dir).resolve(),
            api_key=section.api_key.get_secret_value() or None,
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
        )
