"""Settings: `slmswap.toml` (optional) plus environment variables, read once by pydantic-settings.

Where the file comes from: `--config PATH`, else `$SLMSWAP_CONFIG`, else `./slmswap.toml` if it exists, else none.
Environment variables override the file: `SLMSWAP_STORE__URL`, `SLMSWAP_DEFAULT_BINDING`, ... (`__` nests).
With no file at all every route is bound to `gguf:smollm2-135m` and the store is `.slmswap/slmswap.db`.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.bindings import Binding, parse_binding
from app.capture.redact import EMAIL
from app.errors import ConfigError, UsageError
from app.secrets import register_settings

DEFAULT_BINDING = "gguf:smollm2-135m"
DEFAULT_FILE = "slmswap.toml"
Stage = Literal["teacher", "shadow", "canary", "half", "student"]
# The workflow's agents: routes that always exist, for the graph and for proxy clients (graphs/workflow.py
# checks that its agents are exactly these).
WORKFLOW_AGENTS = ("orchestrator", "retrieval", "processing", "validation", "formatting", "aggregate")


class Section(BaseModel):
    # Files a user writes forbid unknown keys, so a typo is an error, not a silent default.
    model_config = ConfigDict(extra="forbid")


class StoreConfig(Section):
    url: str = "sqlite:///.slmswap/slmswap.db"


class RouteConfig(Section):
    """A route: the teacher (the LLM) and, once rolled out, a student with a rollout stage."""

    teacher: str | None = None
    student: str | None = None
    stage: Stage = "teacher"  # the starting stage; the live one is kept in the store (`slmswap rollout`)
    auto: bool = True  # let the gates move the stage; false freezes it
    # Fall back to the teacher when the student's mean token log-probability is under this (None: never).
    min_confidence: float | None = Field(None, le=0.0)
    repair: bool = False  # apply app/repair.py's deterministic fixes to answers (the raw output is kept)
    # Proxy: replace the client's system prompt by the route's selected template (off: the client's prompt is kept
    # and its outcomes are counted on the template its fingerprint names).
    managed_prompt: bool = False


class RolloutConfig(Section):
    """The gates: the Wilson lower bound (95%) of the student's success a stage needs before the next one."""

    shadow_to_canary: float = Field(0.90, gt=0, le=1)
    canary_to_half: float = Field(0.90, gt=0, le=1)
    half_to_student: float = Field(0.95, gt=0, le=1)
    min_samples: int = Field(200, ge=1)  # judged student calls in a stage before its gates are read
    judge_every: int = Field(10, ge=1)  # a serving process re-reads the gates after this many judged calls
    shadow_concurrency: int = Field(4, ge=0)  # shadow students in flight per process; more are shed and counted
    judge: str | None = None  # a binding that compares free-text shadow answers; without one they are not judged


class TemplatesConfig(Section):
    """Selection among a route's live templates (Thompson sampling on Beta(successes + 1, failures + 1))."""

    min_trials: int = Field(20, ge=1)  # outcomes a template needs before `best` may name it or it may be retired
    # Retire a template (with min_trials) whose probability of being the route's best is under this; 0 never does.
    retire_below: float = Field(0.05, ge=0, lt=1)
    draws: int = Field(2000, ge=100, le=100_000)  # Monte Carlo draws of that probability


class WorkflowConfig(Section):
    max_tool_turns: int = Field(4, ge=1, le=20)
    max_retries: int = Field(1, ge=0, le=5)
    max_tokens: int = Field(384, ge=16)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    data_db: str = ".slmswap/sales.db"


class ProxyConfig(Section):
    """`slmswap serve`: who may call it and how much it takes."""

    api_keys: list[str] = []  # SHA-256 hashes of the keys (`slmswap keys new`), never the keys themselves
    open_routes: bool = False  # an unknown `model` becomes a route on the default binding instead of a 404
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_concurrency: int = Field(64, ge=1)  # requests in flight per route; past that a 429 with Retry-After
    # Distinct client system prompts a route registers as templates; past it they share the route's one
    # "overflow" row (counted, never selected), so a client cannot grow the table without bound.
    max_prompts_per_route: int = Field(32, ge=1)

    @field_validator("api_keys")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        from app.server.auth import normalise_hash

        return [normalise_hash(v) for v in value]


class CaptureConfig(Section):
    # Regular expressions redacted in captured text besides secrets; the default is e-mail addresses.
    redact_patterns: list[str] = [EMAIL]

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class CostConfig(Section):
    # What an hour of this machine costs, for local models (a binding's own usd_per_hour wins). The default is a
    # small cloud VM; set your own, e.g. a GPU's hourly price.
    usd_per_hour: float = Field(0.10, ge=0)


class EvolveConfig(Section):
    # Template evolution (`slmswap templates evolve`, prompts/evolve.py).
    teacher: str | None = None  # a binding that proposes reflective rewrites; none: rule-based evolution only
    examples: int = Field(2, ge=0, le=8)  # worked examples per child
    every_minutes: float = Field(0, ge=0)  # `serve` evolves every route on this period; 0: never


class LoopConfig(Section):
    """The learning loop (`slmswap loop`, or on a schedule inside `serve`): when to train a route's student, how,
    and when to promote it to shadow."""

    every_s: float | None = Field(None, gt=0)  # run inside `slmswap serve` this often; None: only by hand
    routes: list[str] = []  # the routes it looks at (empty: every route)
    min_new_calls: int = Field(100, ge=1)  # qualifying calls captured since the route's last loop run
    min_examples: int = Field(20, ge=1)  # training examples a dataset needs
    share_of_teacher: float = Field(0.9, gt=0, le=1)  # candidate exact >= this x teacher exact to promote
    base: str = DEFAULT_BINDING  # what a student is trained from
    presets: dict[str, str] = {"orchestrator": "orchestrator"}  # per route; others use default_preset
    default_preset: str = "subagent"
    max_steps: int | None = Field(None, ge=1)  # wins over epochs
    epochs: float | None = Field(None, gt=0)
    eval_limit: int | None = Field(None, ge=1)  # held-out calls evaluated at most
    max_tokens: int = Field(256, ge=16)
    dir: str = ".slmswap/loop"  # where datasets, runs and evaluations of each loop run go

    def preset(self, route: str) -> str:
        return self.presets.get(route, self.default_preset)


class LangfuseConfig(Section):
    public_key: str | None = None
    secret_key: SecretStr | None = None  # never printed with the settings
    host: str | None = None


class _FileSource(PydanticBaseSettingsSource):
    """Hands pydantic-settings the already-parsed TOML, below the environment in priority."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMSWAP_", env_nested_delimiter="__", extra="forbid")

    default_binding: str = DEFAULT_BINDING
    store: StoreConfig = StoreConfig()
    routes: dict[str, RouteConfig] = {}
    bindings: dict[str, dict[str, Any]] = {}
    workflow: WorkflowConfig = WorkflowConfig()
    langfuse: LangfuseConfig = LangfuseConfig()
    proxy: ProxyConfig = ProxyConfig()
    rollout: RolloutConfig = RolloutConfig()
    cost: CostConfig = CostConfig()
    capture: CaptureConfig = CaptureConfig()
    evolve: EvolveConfig = EvolveConfig()
    loop: LoopConfig = LoopConfig()
    templates: TemplatesConfig = TemplatesConfig()
    # Where the settings came from (None: defaults and environment only). Not a key users set.
    source: str | None = None

    _file_data: dict[str, Any] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _FileSource(settings_cls, cls._file_data))

    def route(self, name: str) -> RouteConfig:
        """The route's config; a route not in the file is bound to the default binding."""
        route = self.routes.get(name) or RouteConfig()
        return route if route.teacher else route.model_copy(update={"teacher": self.default_binding})

    def route_names(self) -> list[str]:
        """The routes that exist: the workflow's agents and every route in the config."""
        return list(dict.fromkeys([*WORKFLOW_AGENTS, *self.routes]))

    def binding(self, text: str) -> Binding:
        """Parse a binding string with options from this config's `[bindings]` table."""
        return parse_binding(text, self.bindings)

    def bound_to(self, binding: str) -> "Settings":
        """A copy with every route's teacher bound to `binding` (the CLI's --binding)."""
        self.binding(binding)
        routes = {name: r.model_copy(update={"teacher": binding}) for name, r in self.routes.items()}
        return self.model_copy(update={"default_binding": binding, "routes": routes})


def config_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """Which config file applies: the explicit one, $SLMSWAP_CONFIG, or ./slmswap.toml when present."""
    if explicit:
        return Path(explicit)
    if os.environ.get("SLMSWAP_CONFIG"):
        return Path(os.environ["SLMSWAP_CONFIG"])
    default = Path(DEFAULT_FILE)
    return default if default.exists() else None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read the config once: the file (if any) under the environment. Errors name the file and line."""
    file = config_path(path)
    data = _read_toml(file) if file else {}
    Settings._file_data = data
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(_explain(exc, file)) from None
    finally:
        Settings._file_data = {}
    # The environment overrides the file, so a bad value set there is on no line of the file.
    from_env = any(name.upper() == f"{_ENV_PREFIX}DEFAULT_BINDING" for name in os.environ)
    _check_binding(settings, settings.default_binding, None if from_env else file, "default_binding")
    for name, route in settings.routes.items():
        for binding in (route.teacher, route.student):
            if binding:
                _check_binding(settings, binding, file, f"routes.{name}")
    settings.source = str(file) if file else None
    register_settings(settings)  # every key the config points at is redacted wherever it would appear
    return settings


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each `SLMSWAP_*` variable that matches no setting (pydantic-settings ignores them silently).

    >>> unknown_env_vars({"SLMSWAP_STORE_URL": "sqlite:///x.db"})
    ['SLMSWAP_STORE_URL matches no setting and is ignored; did you mean SLMSWAP_STORE__URL?']
    """
    environ = os.environ if environ is None else environ
    known = _env_names()
    warnings = []
    for name in sorted(n for n in environ if n.upper().startswith(_ENV_PREFIX)):
        upper = name.upper()
        if upper in known or upper.startswith(_ENV_MAPS):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see the environment variables in README.md"
        warnings.append(f"{name} matches no setting and is ignored; {hint}")
    return warnings


_ENV_PREFIX = "SLMSWAP_"
# Tables keyed by the user's own names (routes.<route>.teacher, bindings."<binding>".timeout): any key is fine.
_ENV_MAPS = (f"{_ENV_PREFIX}ROUTES__", f"{_ENV_PREFIX}BINDINGS__")


def _env_names() -> set[str]:
    """Every variable name pydantic-settings reads (a section as one JSON value, or each of its keys)."""
    names = {f"{_ENV_PREFIX}CONFIG"}
    for name, field in Settings.model_fields.items():
        if name == "source":
            continue
        names.add(f"{_ENV_PREFIX}{name.upper()}")
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            names.update(f"{_ENV_PREFIX}{name.upper()}__{key.upper()}" for key in section.model_fields)
    return names


def decode_utf8(path: Path, data: bytes, error: type[UsageError] = ConfigError) -> str:
    """`data` (read from `path`) as text; `error` naming the file and line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8; "
                    "save the file as UTF-8") from None


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        text = decode_utf8(file, file.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist; create it (see slmswap.example.toml) or drop --config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: {exc}; fix the TOML syntax there") from None


def _check_binding(settings: Settings, binding: str, file: Path | None, where: str) -> None:
    try:
        settings.binding(binding)
    except ConfigError:
        raise
    except Exception as exc:  # BindingError: add where it was written
        raise ConfigError(f"{_where(file, where.split('.')[-1])}{where}: {exc}") from None


def _explain(exc: ValidationError, file: Path | None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = str(err["loc"][-1]) if err["loc"] else ""
        hint = "unknown key (check its spelling; see slmswap.example.toml)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{_where(file, key)}{loc}: {hint}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _where(file: Path | None, key: str) -> str:
    """`file:line: ` for the first line that sets `key`, or `environment: ` when no file holds it."""
    if file is None or not key:
        return "environment: " if file is None else f"{file}: "
    pattern = re.compile(rf'^\s*("?{re.escape(key)}"?\s*=|\[.*\b{re.escape(key)}\b.*\])')
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if pattern.search(line):
            return f"{file}:{number}: "
    return f"{file}: "
