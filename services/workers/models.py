"""The model providers a worker calls: the policy's entries (and the built-in `simulated` and `local`), each
built when first asked for and built anew when its entry changes, so keys, URLs and timeouts follow the
policy without a restart."""

from __future__ import annotations

import logging
from collections.abc import Callable

from contracts.policy import Policy, ProviderConfig
from services.workers.conversation import Provider
from services.workers.providers import build_provider

log = logging.getLogger(__name__)


class ProviderSet:
    def __init__(self, policy: Callable[[], Policy], simulated: Provider, local_url: str = "") -> None:
        self.policy = policy
        self.simulated = simulated
        self.local_url = local_url
        self.built: dict[str, tuple[ProviderConfig, Provider]] = {}
        self.retired: list[Provider] = []
        """Replaced by a policy change; closed with the worker (a call may still be using one)."""

    def get(self, name: str) -> Provider | None:
        config = self.policy().provider(name)
        if config is None:
            return None
        if config.kind == "simulated":
            return self.simulated
        known = self.built.get(name)
        if known is not None and known[0] == config:
            return known[1]
        if known is not None:
            self.retired.append(known[1])
            log.info("provider %s changed in the policy: new connections", name)
        provider = build_provider(name, config, local_url=self.local_url)
        self.built[name] = (config, provider)
        return provider

    async def aclose(self) -> None:
        for provider in [*self.retired, *(provider for _, provider in self.built.values())]:
            await provider.aclose()
        self.built, self.retired = {}, []
