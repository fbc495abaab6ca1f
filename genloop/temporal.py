"""Connecting to Temporal: the one client factory (API, worker, CLI, tests share it)."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client
from temporalio.envconfig import ClientConfig

from genloop.settings import Settings


async def connect(settings: Settings, **overrides: Any) -> Client:
    """The standard envconfig (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TLS, API key, profiles) with
    genloop's settings filling what it leaves unset."""
    config: dict[str, Any] = dict(ClientConfig.load_client_connect_config())
    config.setdefault("target_host", settings.temporal.target)
    config.setdefault("namespace", settings.temporal.namespace)
    config.update(overrides)
    return await Client.connect(**config)

