from pathlib import Path

import pytest

from app.config import DEFAULT_BINDING, load_settings, unknown_env_vars
from app.errors import ConfigError


def test_no_file_binds_everything_to_smollm2_and_store_under_dot_slmswap():
    s = load_settings()
    assert s.source is None
    assert s.route("retrieval").teacher == DEFAULT_BINDING == "gguf:smollm2-135m"
    assert s.store.url == "sqlite:///.slmswap/slmswap.db"


def test_file_found_in_cwd_and_env_overrides_it(monkeypatch):
    Path("slmswap.toml").write_text('default_binding = "gguf:gemma3-270m"\n[workflow]\nmax_retries = 2\n')
    monkeypatch.setenv("SLMSWAP_WORKFLOW__MAX_RETRIES", "3")
    s = load_settings()
    assert s.source == "slmswap.toml"
    assert s.route("anything").teacher == "gguf:gemma3-270m"
    assert s.workflow.max_retries == 3


def test_explicit_path_and_env_var(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.toml"
    other.write_text('[routes.orchestrator]\nteacher = "azure:gpt-4o"\n')
    monkeypatch.setenv("SLMSWAP_CONFIG", str(other))
    assert load_settings().route("orchestrator").teacher == "azure:gpt-4o"
    assert load_settings().route("retrieval").teacher == DEFAULT_BINDING


def test_syntax_error_names_file_and_line():
    Path("slmswap.toml").write_text('[store]\nurl = "x"\ndefault_binding "oops"\n')
    with pytest.raises(ConfigError, match=r"slmswap.toml: .*line 3"):
        load_settings()


def test_unknown_key_names_file_line_and_key():
    Path("slmswap.toml").write_text('[workflow]\nmax_tool_turns = 3\nmax_retry = 2\n')
    with pytest.raises(ConfigError, match=r"slmswap.toml:3: workflow.max_retry: unknown key"):
        load_settings()


def test_bad_binding_in_route_lists_valid_forms():
    Path("slmswap.toml").write_text('[routes.retrieval]\nteacher = "gpt4:foo"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "slmswap.toml:" in str(exc.value) and "azure:<deployment>" in str(exc.value)


def test_missing_explicit_file_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("nope.toml")


def test_binding_options_from_config_and_inline_wins():
    Path("slmswap.toml").write_text('[bindings."openai:m"]\nbase_url = "http://127.0.0.1:9/v1"\ntimeout = 5\n')
    s = load_settings()
    b = s.binding("openai:m?timeout=7")
    assert b.options.base_url == "http://127.0.0.1:9/v1" and b.options.timeout == 7


def test_bound_to_rebinds_every_route():
    Path("slmswap.toml").write_text('[routes.orchestrator]\nteacher = "azure:gpt-4o"\n')
    s = load_settings().bound_to("gguf:gemma3-270m")
    assert s.route("orchestrator").teacher == s.route("x").teacher == "gguf:gemma3-270m"


def test_example_config_parses_and_is_the_defaults(monkeypatch):
    from tests.conftest import ROOT

    s = load_settings(ROOT / "slmswap.example.toml")
    assert s.default_binding == DEFAULT_BINDING


def test_bad_default_binding_names_file_and_line():
    Path("slmswap.toml").write_text('# models\n\ndefault_binding = "gpt4"\n[store]\nurl = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError, match=r"(?s)slmswap.toml:3: default_binding: .*azure:<deployment>"):
        load_settings()


def test_bad_default_binding_from_the_environment_names_the_environment(monkeypatch):
    Path("slmswap.toml").write_text('default_binding = "gguf:gemma3-270m"\n')  # fine, and overridden
    monkeypatch.setenv("SLMSWAP_DEFAULT_BINDING", "gpt4")
    with pytest.raises(ConfigError, match=r"^environment: default_binding: "):
        load_settings()


def test_config_that_is_not_utf8_names_file_and_line():
    Path("slmswap.toml").write_bytes(b'[workflow]\nmax_retries = 2\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"slmswap.toml:3: byte 0xe9 at column 6 is not UTF-8"):
        load_settings()


@pytest.mark.parametrize("name, closest", [
    ("SLMSWAP_STORE_URL", "SLMSWAP_STORE__URL"),
    ("SLMSWAP_DEFAULT_BINDINGS", "SLMSWAP_DEFAULT_BINDING"),
    ("SLMSWAP_WORKFLOW__MAX_RETRY", "SLMSWAP_WORKFLOW__MAX_RETRIES"),
    ("slmswap_config_file", "SLMSWAP_CONFIG"),
])
def test_unknown_environment_variable_is_named_with_the_closest_setting(name, closest):
    assert unknown_env_vars({name: "x", "HOME": "/root"}) == [
        f"{name} matches no setting and is ignored; did you mean {closest}?"]


def test_every_real_setting_variable_is_known():
    real = ["SLMSWAP_CONFIG", "SLMSWAP_DEFAULT_BINDING", "SLMSWAP_STORE__URL", "SLMSWAP_STORE",
            "SLMSWAP_WORKFLOW__MAX_TOOL_TURNS", "SLMSWAP_LANGFUSE__SECRET_KEY", "SLMSWAP_ROUTES__RETRIEVAL__TEACHER",
            "slmswap_store__url"]
    assert unknown_env_vars(dict.fromkeys(real, "x")) == []
    assert unknown_env_vars({"SLMSWAP_NOTHING_LIKE_IT_AT_ALL": "x"}) == [
        "SLMSWAP_NOTHING_LIKE_IT_AT_ALL matches no setting and is ignored; see the environment variables in README.md"]


def test_store_url_variable_really_is_read(monkeypatch):
    # The name the warning suggests is the one pydantic-settings reads.
    monkeypatch.setenv("SLMSWAP_STORE__URL", "sqlite:///elsewhere.db")
    assert load_settings().store.url == "sqlite:///elsewhere.db"


def test_proxy_max_prompts_per_route_defaults_to_32_and_must_be_positive():
    assert load_settings().proxy.max_prompts_per_route == 32
    Path("slmswap.toml").write_text("[proxy]\nmax_prompts_per_route = 0\n")
    with pytest.raises(ConfigError, match=r"slmswap.toml:2: proxy.max_prompts_per_route: .*greater than or equal to 1"):
        load_settings()
