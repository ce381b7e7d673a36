"""Model servers for the tests: the local model (llama.cpp, real tokens) and LiteLLM's proxy (a third-party
OpenAI- and Anthropic-compatible gateway, with scripted models and errors on demand).

Import the fixtures into a test module (`from tests.model_servers import litellm, local_model_url`). Each
server starts once per test session, however many modules import its fixture, and stops at its end.

    local_model_url   `http://127.0.0.1:PORT/v1` of services.local_model (SmolLM2-135M; no key). Both
                      protocols' providers take it as their base_url (or as build_provider's local_url).
    litellm           a LiteLLMProxy: `.base_url` (`http://127.0.0.1:PORT/v1`, for both protocols: its
                      Anthropic endpoint is only at /v1/messages) and `.key` (its master key: a provider's
                      api_key_env must name a variable holding it, as `litellm_key_env` sets).

LiteLLM's models (LITELLM_MODELS; tests/litellm/corral_hooks.py scripts the first six):

    tool-then-text        calls the first tool offered, then, once the conversation holds a tool result,
                          answers "The tool said: <result>"
    tools-then-text       calls every tool offered at once, then answers "The tools said: <r1> | <r2> …"
    once/TOOL             calls TOOL (offered or not) once, then answers "The tool said: <result>"
    bad-arguments/TOOL    as once/TOOL, with arguments that are not JSON
    always/TOOL           calls TOOL every time (offered or not), e.g. `always/send_email`
    rate-limited/SECONDS  HTTP 429 with `Retry-After: SECONDS`
    mock-text             "Hello from the mock." (streamed on /chat/completions; on /v1/messages LiteLLM
                          answers a mock whole, unstreamed, with made-up usage)
    server-error          HTTP 500 (LiteLLM's InternalServerError)
    context-too-long      HTTP 400 (LiteLLM's ContextWindowExceededError)

The scripted models report usage of 11 input and 7 output tokens. No call leaves the machine: every model
entry points at a closed loopback port, and the cost map is LiteLLM's bundled one. A test that needs other
models starts its own proxy with `litellm_proxy(litellm_config([...]), tmp_path)` (about 10 s).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import yaml

from services.local_model import MODEL_NAME, local_model_server
from services.stack import Process, StackError, free_port

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_BIN = LITELLM_VENV / "bin" / "litellm"
HOOKS_DIR = ROOT / "tests" / "litellm"
LITELLM_START_TIMEOUT_S = 90.0
"""Its first start in a new environment compiles its modules: well over its usual 10 s."""
LITELLM_KEY_ENV = "CORRAL_TEST_LITELLM_KEY"
CLOSED_PORT_BASE = "http://127.0.0.1:9/v1"
"""Where LiteLLM would send a call its mocks did not answer: the discard port, closed on loopback."""
LOCAL_MODEL = MODEL_NAME


def _entry(name: str, **params: Any) -> dict[str, Any]:
    model = "openai/*" if name.endswith("/*") else f"openai/{name}"
    return {"model_name": name,
            "litellm_params": {"model": model, "api_key": "unused", "api_base": CLOSED_PORT_BASE, **params}}


LITELLM_MODELS = [
    _entry("tool-then-text"),
    _entry("tools-then-text"),
    _entry("once/*"),
    _entry("bad-arguments/*"),
    _entry("always/*"),
    _entry("rate-limited/*"),
    _entry("mock-text", mock_response="Hello from the mock."),
    _entry("server-error", mock_response="litellm.InternalServerError"),
    _entry("context-too-long", mock_response="litellm.ContextWindowExceededError"),
]


def litellm_config(models: list[dict[str, Any]]) -> dict[str, Any]:
    """A proxy configuration serving `models`, with Corral's hooks, no retries and no cooldowns;
    its master key comes from LITELLM_MASTER_KEY (litellm_proxy sets it)."""
    return {
        "model_list": models,
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        "litellm_settings": {
            "callbacks": "corral_hooks.hooks",
            # /v1/messages would send OpenAI models to the Responses API, which ignores a hook's mock_response
            "use_chat_completions_url_for_anthropic_messages": True,
        },
        # one answer per call: a retried mock error would take seconds, a cooled-down model answer another error
        "router_settings": {"num_retries": 0, "disable_cooldowns": True},
    }


class LiteLLMProxy(NamedTuple):
    url: str
    """`http://127.0.0.1:PORT`, its root."""
    key: str

    @property
    def base_url(self) -> str:
        """A provider's base_url for it, of either protocol."""
        return f"{self.url}/v1"


@contextmanager
def litellm_proxy(config: dict[str, Any], tmp_path: Path, *, master_key: str | None = None) -> Iterator[LiteLLMProxy]:
    """Run LiteLLM's proxy with `config` on a free loopback port until the block ends; yield its root URL and
    master key once it answers `/health/liveliness`."""
    if not LITELLM_BIN.exists():
        pytest.fail(f"{LITELLM_BIN} is missing: `make test` builds it (or `make litellm` alone)", pytrace=False)
    key = master_key or f"sk-corral-test-{secrets.token_hex(8)}"
    config_path = tmp_path / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    env = {
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches the model cost map from the internet
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_LOG": "WARNING",
        "PYTHONPATH": str(HOOKS_DIR),  # `corral_hooks`, named by the config's callbacks
        "CORRAL_TEST_URL": f"http://127.0.0.1:{port}/health/liveliness",  # the hooks' `url` argument: itself
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    proc = Process("litellm", [str(LITELLM_BIN), "--config", str(config_path), "--host", "127.0.0.1",
                               "--port", str(port)], tmp_path / "litellm.log", env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_alive(proc, f"{url}/health/liveliness", LITELLM_START_TIMEOUT_S)
        yield LiteLLMProxy(url, key)
    finally:
        proc.stop()


def _wait_until_alive(proc: Process, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StackError(f"LiteLLM's proxy exited (code {proc.popen.returncode}); see {proc.log_path}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise StackError(f"LiteLLM's proxy did not answer {url} within {timeout:.0f} s; see {proc.log_path}")


_shared: dict[str, Any] = {}


@contextmanager
def _once_per_session(name: str, start: Callable[[], AbstractContextManager[Any]]) -> Iterator[Any]:
    """The server `name`, started by the first fixture instance that asks (pytest makes one per module that
    imports a fixture, even a session-scoped one) and stopped when that instance ends, at the session's end."""
    if name in _shared:
        yield _shared[name]
        return
    with start() as server:
        _shared[name] = server
        try:
            yield server
        finally:
            del _shared[name]


@pytest.fixture(scope="session")
def local_model_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local model server's base URL, `http://127.0.0.1:PORT/v1` (no key)."""
    with _once_per_session("local-model", lambda: local_model_server(tmp_path_factory.mktemp("local-model"))) as url:
        yield url


@pytest.fixture(scope="session")
def litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiteLLMProxy]:
    """LiteLLM's proxy with LITELLM_MODELS."""
    with _once_per_session("litellm", lambda: litellm_proxy(litellm_config(LITELLM_MODELS),
                                                            tmp_path_factory.mktemp("litellm"))) as proxy:
        yield proxy


@pytest.fixture
def litellm_key_env(litellm: LiteLLMProxy, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an environment variable holding the proxy's key, for a provider's api_key_env."""
    monkeypatch.setenv(LITELLM_KEY_ENV, litellm.key)
    return LITELLM_KEY_ENV


__all__ = ["LITELLM_MODELS", "LOCAL_MODEL", "LiteLLMProxy", "litellm", "litellm_config", "litellm_key_env",
           "litellm_proxy", "local_model_url"]
