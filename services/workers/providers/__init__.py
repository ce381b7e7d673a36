"""The real model providers: OpenAI's chat completions and Anthropic's Messages API, over HTTP (httpx, no SDK).

A policy names each provider (`[providers.NAME]`, contracts.policy.ProviderConfig); `build_provider` makes
the client for one. Every call streams; failures raise the ProviderError subclass of their class
(services.workers.errors), and keys never appear in what they say (services.workers.providers.http).
"""

from __future__ import annotations

from contracts.policy import ProviderConfig
from services.workers.providers.anthropic import AnthropicProvider
from services.workers.providers.http import LOCAL_MODEL_ENV
from services.workers.providers.openai import OpenAIProvider

HttpProvider = OpenAIProvider | AnthropicProvider


def build_provider(name: str, config: ProviderConfig, *, local_url: str = "") -> HttpProvider:
    """The provider the policy calls `name`. An empty `base_url` means `local_url`, the local model server the
    stack runs (its OpenAI base, e.g. `http://127.0.0.1:8089/v1`, which serves Anthropic's `/v1/messages`
    too); with neither, every call fails as permanent, saying what to set. Close it with `aclose()`."""
    base_url = config.base_url or local_url
    if config.kind == "openai":
        return OpenAIProvider(name, config, base_url)
    if config.kind == "anthropic":
        return AnthropicProvider(name, config, base_url)
    raise ValueError(f"provider {name!r} is of kind {config.kind!r}: build_provider makes openai and anthropic ones")


__all__ = ["AnthropicProvider", "HttpProvider", "LOCAL_MODEL_ENV", "OpenAIProvider", "build_provider"]
