"""Corral's contracts: every message on the bus, and every name it travels under."""

from contracts import subjects
from contracts.events import *  # noqa: F403 - the contracts are this package's API
from contracts.events import ALL_CONTRACTS, CONTRACT_VERSION
from contracts.queries import QUERY_CONTRACTS

__all__ = ["ALL_CONTRACTS", "CONTRACT_VERSION", "QUERY_CONTRACTS", "subjects"]
