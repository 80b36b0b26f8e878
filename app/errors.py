"""The errors slm-swap raises on purpose. Each message says what happened and what to do.

    SlmSwapError                 base; the CLI prints it without a traceback
     ├── UsageError              bad input from the user: CLI exit 2, HTTP 400
     │    ├── ConfigError        config file or environment does not parse or validate
     │    └── BindingError       a binding string or its options are malformed or unknown
     ├── MissingDependency       a package, key or file a binding needs is absent (names the fix)
     ├── BackendError            a model backend failed while answering (HTTP 502)
     │    ├── BadReply           the upstream answered, in a shape that is not a chat completion
     │    └── UpstreamTimeout    no answer within the binding's timeout (HTTP 504)
     ├── StoreError              the capture store cannot be opened or written
     └── ToolError               a tool was given bad arguments; returned to the model, never raised past the loop
"""

from __future__ import annotations

from app.secrets import redact_text


class SlmSwapError(Exception):
    """Base of every error slm-swap raises on purpose. Its message is redacted (app/secrets.py): an upstream that
    echoes a key, or a binding with a password in its base_url, never puts the secret into an error."""

    exit_code = 1
    http_status = 500
    error_type = "server_error"

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class UsageError(SlmSwapError):
    exit_code = 2
    http_status = 400
    error_type = "invalid_request_error"


class ConfigError(UsageError):
    pass


class BindingError(UsageError):
    pass


class MissingDependency(SlmSwapError):
    exit_code = 2
    http_status = 500
    error_type = "missing_dependency"


class BackendError(SlmSwapError):
    http_status = 502
    error_type = "backend_error"
    capture_type = "backend_error"  # the error_type a captured failed call gets


class BadReply(BackendError):
    pass


class UpstreamTimeout(BackendError):
    http_status = 504
    error_type = "timeout"
    capture_type = "timeout"


class StoreError(SlmSwapError):
    error_type = "store_error"


class ToolError(SlmSwapError):
    exit_code = 2
    error_type = "tool_error"


# Errors of the setup rather than of one call (a model file missing, a key unset, a bad binding): every call would
# fail the same way, so a run stops on them instead of reporting each task as failed.
SETUP_ERRORS = (MissingDependency, ConfigError, BindingError)
