"""`slmswap studio`: serve the workflow graph to LangGraph Studio through `langgraph dev`, on this project's config.

The server is a child process started in the caller's working directory, so `./slmswap.toml`, the capture store
and `.langgraph_api/` are the ones the CLI uses there; the config file reaches it as an absolute `$SLMSWAP_CONFIG`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from app.errors import MissingDependency, UsageError

ROOT = Path(__file__).resolve().parent.parent
GRAPH_CONFIG = ROOT / "langgraph.json"
DEFAULT_PORT = 2024
STUDIO = "https://smith.langchain.com/studio/?baseUrl={url}"
# Without these `langgraph dev` calls out at start (its analytics call has no timeout) and traces to LangSmith.
OFFLINE_ENV = {"LANGGRAPH_CLI_NO_ANALYTICS": "1", "LANGGRAPH_NO_VERSION_CHECK": "true", "LANGSMITH_TRACING": "false"}


def run_studio(port: int | None, config_path: str | None, host: str = "127.0.0.1") -> int:
    """Serve the graph until Ctrl-C; returns the server's exit code.

    Example: `slmswap studio --port 2024`, then open
    https://smith.langchain.com/studio/?baseUrl=http://127.0.0.1:2024
    """
    port = DEFAULT_PORT if port is None else port
    argv, env = server_args(port, config_path, host)
    print(f"LangGraph Studio: {studio_url(host, port)}  (Ctrl-C stops the server)", file=sys.stderr)
    return serve(subprocess.Popen(argv, env=env))


def server_args(port: int, config_path: str | None, host: str = "127.0.0.1", *, graph_config: Path = GRAPH_CONFIG,
                reload: bool = True, base_env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The `langgraph dev` command line and environment, after checking the install, the config and the port."""
    if importlib.util.find_spec("langgraph_api") is None:
        raise MissingDependency('langgraph dev needs the in-memory server; pip install "langgraph-cli[inmem]"')
    if not graph_config.is_file():
        raise MissingDependency(f"{graph_config} is missing; run slmswap studio from a checkout (pip install -e .)")
    config = resolve_config(config_path)
    ensure_port_free(host, port)
    env = server_env(config, os.environ if base_env is None else base_env)
    return server_command(host, port, graph_config, reload), env


def resolve_config(config_path: str | None) -> Path | None:
    """The config file the CLI would read (validated now, so a bad one fails before the server starts), absolute."""
    from app.config import config_path as which, load_settings

    file = which(config_path)
    if file is None:
        return None
    load_settings(file)
    return file.resolve()


def ensure_port_free(host: str, port: int) -> None:
    """UsageError if something listens on host:port (`langgraph dev` would silently move to another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port a server just left (TIME_WAIT) counts as free, as it does for uvicorn itself.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise UsageError(f"port {port} on {host} is in use; stop what listens there or pick another port, "
                             f"e.g. slmswap studio --port {port + 1}") from None


def server_command(host: str, port: int, graph_config: Path = GRAPH_CONFIG, reload: bool = True) -> list[str]:
    argv = [sys.executable, "-m", "langgraph_cli", "dev", "--no-browser", "--host", host, "--port", str(port),
            "--config", str(graph_config)]
    return argv if reload else [*argv, "--no-reload"]


def server_env(config: Path | None, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the offline switches on and `SLMSWAP_CONFIG` naming the config (or unset when there is none)."""
    env = {**base, **OFFLINE_ENV}
    env.pop("SLMSWAP_CONFIG", None)
    if config is not None:
        env["SLMSWAP_CONFIG"] = str(config)
    return env


def studio_url(host: str, port: int) -> str:
    return STUDIO.format(url=f"http://{host}:{port}")


def serve(proc: subprocess.Popen) -> int:
    """Wait for the server; on Ctrl-C (which the server, in our process group, gets too) wait for its clean exit."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            return proc.wait()
