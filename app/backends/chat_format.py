"""Chat messages to a local model's prompt text, and its tool-call output back to OpenAI tool calls.

The one prompt renderer for serving (llama.cpp, hf) and for training text (`training_text`, `training_ids`), so a
LoRA learns exactly the tokens it is later served. `PromptFormat` picks, per model:
- the model's own chat template (jinja, rendered as llama-cpp-python's Jinja2ChatFormatter does) when it has a tools
  section in the Hermes format (`<tool_call>`), as the Qwen2.5-Coder GGUFs do;
- else hand-written ChatML (SmolLM2: its template has no tools section) or Gemma turns (Gemma-3-270M's GGUF carries
  no template; system folded into the first user turn).
Tools, calls and results are written and read by the one Hermes codec, `app/hermes.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app import hermes
from app.wire import Message, ToolCall

Family = Literal["chatml", "gemma"]
FormatKind = Literal["chatml", "gemma", "template"]
END_OF_TURN = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>"}

CHATML_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # from the GGUF template


@dataclass(frozen=True)
class Turn:
    role: Literal["system", "user", "assistant"]
    text: str


def family_of(metadata: dict[str, str]) -> Family:
    """The prompt family for a GGUF file's metadata (gemma architectures get Gemma turns, the rest ChatML)."""
    arch = metadata.get("general.architecture", "")
    template = metadata.get("tokenizer.chat_template", "")
    return "gemma" if arch.startswith("gemma") or "<start_of_turn>" in template else "chatml"


def render_prompt(messages: list[Message], functions: list[dict[str, Any]], family: Family) -> str:
    """The full prompt text, ending where the assistant's reply begins.

    >>> render_prompt([Message(role="user", content="hi")], [], "chatml").endswith("<|im_start|>assistant\\n")
    True
    """
    turns = to_turns(messages, functions)
    return render_gemma(turns) if family == "gemma" else render_chatml(turns)


def to_turns(messages: list[Message], functions: list[dict[str, Any]]) -> list[Turn]:
    """OpenAI messages as plain turns: one system turn first (with the tool prompt), calls and results as text."""
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    system = hermes.system_with_tools(system, functions)  # the one rule of where the tool list goes
    turns = [Turn("system", system)] if system else []
    for msg in messages:
        if msg.role == "tool":
            _add_tool_result(turns, msg)
        elif msg.role in ("user", "assistant"):
            turns.append(Turn(msg.role, assistant_text(msg) if msg.role == "assistant" else msg.text()))
    return turns


def assistant_text(msg: Message) -> str:
    return hermes.assistant_text(msg.text(), [(c.function.name, c.function.arguments) for c in msg.tool_calls or []])


def _add_tool_result(turns: list[Turn], msg: Message) -> None:
    # Consecutive tool results share one user turn, as Hermes/Qwen-style templates render them.
    block = hermes.tool_response(msg.text())
    last = turns[-1] if turns else None
    if last and last.role == "user" and last.text.startswith(hermes.RESPONSE_OPEN):
        turns[-1] = Turn("user", f"{last.text}\n{block}")
    else:
        turns.append(Turn("user", block))


def render_chatml(turns: list[Turn]) -> str:
    if not turns or turns[0].role != "system":
        turns = [Turn("system", CHATML_DEFAULT_SYSTEM), *turns]
    body = "".join(f"<|im_start|>{t.role}\n{t.text}<|im_end|>\n" for t in turns)
    return body + "<|im_start|>assistant\n"


def render_gemma(turns: list[Turn]) -> str:
    system = turns[0].text if turns and turns[0].role == "system" else ""
    rest = turns[1:] if system else turns
    if system and rest and rest[0].role == "user":
        rest = [Turn("user", f"{system}\n\n{rest[0].text}"), *rest[1:]]
    elif system:
        rest = [Turn("user", system), *rest]
    roles = {"assistant": "model", "user": "user"}
    body = "".join(f"<start_of_turn>{roles[t.role]}\n{t.text}<end_of_turn>\n" for t in rest)
    return body + "<start_of_turn>model\n"


# ---- the format a model is served (and trained) with ------------------------------------------------------

@dataclass(frozen=True)
class PromptFormat:
    """How one model's prompts are written: a hand-written family, or the model's own chat template."""

    kind: FormatKind
    end_of_turn: str
    template: str | None = None  # the jinja chat template (kind "template")
    bos_token: str = ""
    eos_token: str = ""
    _compiled: list[Any] = field(default_factory=list, compare=False, repr=False)

    @property
    def family(self) -> Family:
        """The hand-written family this format is closest to (the llama.cpp backend's `LocalModel.family`)."""
        return "gemma" if self.kind == "gemma" else "chatml"

    def render(self, messages: list[Message] | list[dict[str, Any]], functions: list[dict[str, Any]]) -> str:
        """The prompt text, ending where the assistant's reply begins."""
        msgs = _messages(messages)
        if self.kind != "template":
            return render_prompt(msgs, functions, self.kind)
        return self._jinja(msgs, functions, add_generation_prompt=True)

    def answer_text(self, messages: list[Message], functions: list[dict[str, Any]], answer: Message) -> str:
        """What the model writes for `answer` after `render(messages, functions)`, through its end-of-turn marker."""
        if self.kind != "template":
            return assistant_text(answer) + self.end_of_turn
        prompt = self._jinja(messages, functions, add_generation_prompt=True)
        full = self._jinja([*messages, answer], functions, add_generation_prompt=False)
        if not full.startswith(prompt) or self.end_of_turn not in full[len(prompt):]:
            raise ValueError("this chat template does not render an answer as a continuation of its prompt")
        rest = full[len(prompt):]
        return rest[:rest.rindex(self.end_of_turn) + len(self.end_of_turn)]

    def _jinja(self, messages: list[Message], functions: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not self._compiled:
            self._compiled.append(_compile(self.template or ""))
        # The template writes the tool list only where the system prompt does not hold it (hermes.system_with_tools).
        system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
        listed = functions and not hermes.holds_tools(system, functions)
        tools = [{"type": "function", "function": f} for f in functions] if listed else None
        return self._compiled[0].render(
            messages=_template_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, raise_exception=_raise, strftime_now=_strftime_now)


def hand_format(family: Family) -> PromptFormat:
    return PromptFormat(family, END_OF_TURN[family])


def has_tools_section(template: str) -> bool:
    """A chat template that renders `tools` itself, in the Hermes format this codec parses back."""
    return "tools" in template and hermes.TOOL_OPEN in template


def prompt_format_of(metadata: dict[str, str]) -> PromptFormat:
    """The format for a GGUF's metadata (`llama.metadata`): its own template when that has a tools section,
    else the hand-written family (`family_of`)."""
    template = metadata.get("tokenizer.chat_template", "")
    family = family_of(metadata)
    if template and has_tools_section(template) and family == "chatml":
        return PromptFormat("template", END_OF_TURN["chatml"], template, metadata.get("bos_token", ""),
                            metadata.get("eos_token", ""))
    return hand_format(family)


def prompt_format_for(target: str) -> PromptFormat:
    """The format for a training/serving target: an alias, a .gguf path, or an HF model / peft adapter directory
    (a plain checkpoint made from a GGUF, or an adapter on one, gets its GGUF's format)."""
    import json

    target = target.removeprefix("gguf:").removeprefix("hf:")
    from app.local_models import ALIASES, resolve_model

    if target in ALIASES or target.endswith(".gguf"):
        return prompt_format_of(gguf_metadata(resolve_model(target)))
    path = Path(target).expanduser()
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        return prompt_format_for(json.loads(adapter.read_text())["base_model_name_or_path"])
    source = path / "slmswap_source.json"
    if source.is_file():
        return prompt_format_for(json.loads(source.read_text())["gguf"])
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    tok = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    template = tok.get("chat_template") or ""
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    meta = {"general.architecture": str(config.get("model_type", "")), "tokenizer.chat_template": template,
            "bos_token": _token_text(tok.get("bos_token")), "eos_token": _token_text(tok.get("eos_token"))}
    return prompt_format_of(meta)


def gguf_metadata(path: Path) -> dict[str, str]:
    """The metadata `prompt_format_of` reads, from a GGUF header (no model load)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def text(key: str) -> str:
        f = reader.fields.get(key)
        return bytes(f.parts[f.data[0]]).decode() if f else ""

    return {"general.architecture": text("general.architecture"),
            "tokenizer.chat_template": text("tokenizer.chat_template")}


def training_text(fmt: PromptFormat, messages: list[dict[str, Any]] | list[Message],
                  tools: list[dict[str, Any]] | None, answer_message: dict[str, Any] | Message) -> tuple[str, str]:
    """(prompt, completion): the prompt exactly as served for (messages, tools), and the answer as the model
    writes it, ending with its end-of-turn marker."""
    from app.toolplan import plan_tools

    msgs = _messages(messages)
    functions = plan_tools(tools).functions if tools else []
    answer = answer_message if isinstance(answer_message, Message) else Message.model_validate(answer_message)
    return fmt.render(msgs, functions), fmt.answer_text(msgs, functions, answer)


def training_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) for an HF tokenizer: the prompt tokenized as llama.cpp tokenizes it for serving
    (special tokens parsed, BOS only where the model adds one), then the completion's tokens, mask 1 on those."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    # BOS exactly where the tokenizer adds it to a text (Gemma), as llama.cpp does from the GGUF's add_bos_token;
    # the tokenizer's `add_bos_token` attribute is not reliable (False on Gemma's, which adds one).
    if bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] and p[:1] != [bos]:
        p = [bos, *p]
    return [*p, *c], [0] * len(p) + [1] * len(c)


def _messages(messages: list[Message] | list[dict[str, Any]]) -> list[Message]:
    return [m if isinstance(m, Message) else Message.model_validate(m) for m in messages]


def _template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: system/developer merged first, call arguments as data."""
    import json

    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer"))
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        entry: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args: Any = json.loads(c.function.arguments or "{}")
                except json.JSONDecodeError:
                    args = c.function.arguments
                calls.append({"type": "function", "id": c.id, "function": {"name": c.function.name, "arguments": args}})
            entry["tool_calls"] = calls
        out.append(entry)
    return out


def _compile(template: str) -> Any:
    """The template compiled as llama-cpp-python's Jinja2ChatFormatter (and transformers) compile chat templates."""
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template)


def _raise(message: str) -> None:
    raise ValueError(message)


def _strftime_now(f: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(f)


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else (token or "")


# ---- output ----------------------------------------------------------------------------------------------

def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, OpenAI tool calls) with the Hermes codec (`hermes.split_output`).

    >>> content, calls = parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    >>> content, calls[0].function.name, calls[0].function.arguments
    (None, 'f', '{"x": 1}')
    """
    content, calls = hermes.split_output(text)
    return content, hermes.to_tool_calls(calls)


def held_back(text: str, markers: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a marker, and so must not be streamed yet.

    >>> held_back("Sure <tool", ["<tool_call>"])
    5
    """
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest
