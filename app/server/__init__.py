"""The OpenAI-compatible proxy: `create_app(settings)` is the ASGI app, `serve(...)` runs it under uvicorn."""

from __future__ import annotations

import os

from app.errors import UsageError
from app.server.auth import is_loopback

CONFIG_ENV = "SLMSWAP_CONFIG"


def app_factory():
    """uvicorn's factory (one call per worker process): the settings come from $SLMSWAP_CONFIG or ./slmswap.toml."""
    from app.config import load_settings
    from app.secrets import install_log_redaction
    from app.server.routes import create_app
    from app.services import Services
    from prompts.store import ProxyPrompts  # the composition root: app/ itself never imports prompts/

    install_log_redaction()
    settings = load_settings()
    services = Services.from_settings(settings)
    prompts = (ProxyPrompts(services.store, max_prompts=settings.proxy.max_prompts_per_route)
               if services.store is not None else None)
    return create_app(settings, services, prompts,
                      periodic=scheduled_jobs(settings, services.store))


def scheduled_jobs(settings, store):
    """The jobs `serve` runs on a period, from the config: template evolution when `[evolve] every_minutes` > 0,
    the learning loop when `[loop] every_s` is set. This factory is the server's composition root, so it alone
    reaches up to prompts/ and training/ (lazily, only for the jobs configured)."""
    from app.server.schedule import Periodic

    jobs = []
    if settings.evolve.every_minutes > 0:
        from prompts.cli_evolve import scheduled_evolution

        jobs.append(Periodic("templates evolve", settings.evolve.every_minutes * 60, scheduled_evolution(settings)))
    if settings.loop.every_s is not None and store is not None:
        from training.loop import Schedule

        # Schedule.tick takes a machine-wide lock, so with --workers N one process trains at a time.
        jobs.append(Periodic("learning loop", settings.loop.every_s, Schedule(settings, store).tick))
    return tuple(jobs)


def serve(host: str, port: int, workers: int, config: str | None, allow_unauthenticated: bool) -> None:
    """Check the settings, refuse an unauthenticated server off loopback, then run uvicorn until Ctrl-C."""
    import uvicorn

    from app.config import load_settings

    settings = load_settings(config)  # a bad config fails here, once, not in every worker
    if not settings.proxy.api_keys and not is_loopback(host) and not allow_unauthenticated:
        raise UsageError(f"refusing to serve on {host} without API keys: anyone who reaches it could use your "
                         "models. Add [proxy] api_keys (make one with `slmswap keys new`), bind to 127.0.0.1, or "
                         "pass --allow-unauthenticated")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if config:
        os.environ[CONFIG_ENV] = os.path.abspath(config)
    uvicorn.run("app.server:app_factory", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False)
