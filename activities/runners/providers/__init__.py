"""Adapters over the official model SDKs, one module per wire protocol, behind the small interface in
`base`. `model_client` is the one place that picks an adapter; each SDK is imported only when used."""

from __future__ import annotations

from activities.runners.providers.base import ModelClient
from genloop.errors import ErrorKind, GenloopError

PROVIDERS = ("openai", "anthropic")


def model_client(
    provider: str, *, api_key: str, base_url: str, model: str, timeout_s: float, stream: bool = True
) -> ModelClient:
    if provider == "openai":
        from activities.runners.providers.openai import OpenAIClient

        return OpenAIClient(api_key=api_key, base_url=base_url, model=model, timeout_s=timeout_s, stream=stream)
    if provider == "anthropic":
        from activities.runners.providers.anthropic import AnthropicClient

        return AnthropicClient(api_key=api_key, base_url=base_url, model=model, timeout_s=timeout_s, stream=stream)
    raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown model provider {provider!r} (one of {', '.join(PROVIDERS)})")
