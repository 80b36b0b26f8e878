import pytest

from app.bindings import parse_binding
from app.cost import cost_usd
from app.errors import BindingError


def test_inline_options_are_typed_and_canonical_is_sorted():
    b = parse_binding("gguf:smollm2-135m?n_ctx=2048&lora=runs/x/adapter.gguf")
    assert (b.kind, b.target, b.options.n_ctx, b.options.lora) == ("gguf", "smollm2-135m", 2048, "runs/x/adapter.gguf")
    assert b.canonical() == "gguf:smollm2-135m?lora=runs/x/adapter.gguf&n_ctx=2048"
    assert b.name == "gguf:smollm2-135m"


@pytest.mark.parametrize("text", ["smollm2", "foo:bar", "gguf:", "", "openai"])
def test_unknown_binding_lists_valid_forms(text):
    with pytest.raises(BindingError) as exc:
        parse_binding(text)
    for form in ("azure:<deployment>", "openai:<model>", "gguf:<alias|path>", "hf:<path>"):
        assert form in str(exc.value)


def test_unknown_or_mistyped_option_names_valid_options():
    with pytest.raises(BindingError, match="options for gguf: .*n_ctx"):
        parse_binding("gguf:smollm2-135m?nctx=4")
    with pytest.raises(BindingError, match="n_ctx"):
        parse_binding("gguf:smollm2-135m?n_ctx=many")


def test_cost_table_prefix_and_override():
    assert cost_usd(parse_binding("azure:gpt-4o-2024-08-06"), 1_000_000, 0) == 2.5
    assert cost_usd(parse_binding("gguf:smollm2-135m"), 10_000, 10_000) == 0.0
    assert cost_usd(parse_binding("gguf:smollm2-135m?price_out=1"), 0, 1_000_000) == 1.0
    assert cost_usd(parse_binding("azure:my-deployment"), 1_000_000, 0) == 30.0  # unknown hosted: priced as gpt-4
