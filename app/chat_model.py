"""A LangChain chat model over the Router, bound to one route.

Graph nodes talk to models through this class, so LangChain callbacks (Langfuse's handler among them) see every
node call as a chat-model run, and `bind_tools` / `with_structured_output` work as with any LangChain model.
Each call passes who is calling (route, template id, run id) to the Router as a CallContext beside the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict

from app.routing.context import CallContext
from app.toolplan import from_langchain
from app.wire import ChatRequest, ChatResponse, Message, ToolCall

ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}


class RouterChatModel(BaseChatModel):
    """`RouterChatModel(router=router, route="retrieval", template_id="retrieval/base@1")`."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    router: Any
    route: str
    template_id: str | None = None
    run_id: str | None = None
    source: str = "graph"
    max_tokens: int | None = None
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return "slmswap-router"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"route": self.route, "template_id": self.template_id}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_model_name"] = self.route
        return params

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        resp = await self.router.complete(self.to_request(messages, stop, **kwargs), self.context())
        return to_chat_result(resp)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        # Sync callers (Studio's sync paths, scripts) get the async path on a private loop in a worker thread,
        # which works whether or not the calling thread already runs an event loop.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._agenerate(messages, stop, None, **kwargs)).result()

    def context(self) -> CallContext:
        return CallContext(route=self.route, run_id=self.run_id, template_id=self.template_id, source=self.source)

    def to_request(self, messages: list[BaseMessage], stop: list[str] | None = None, **kwargs: Any) -> ChatRequest:
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature, "stop": stop}
        params.update({k: v for k, v in kwargs.items() if k in ChatRequest.model_fields})
        return ChatRequest(model=self.route, messages=[to_wire_message(m) for m in messages],
                           **{k: v for k, v in params.items() if v is not None})

    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: str | dict | None = None, parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind OpenAI tools; tool_choice takes "auto", "none", "required"/"any", or a function name."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        bound: dict[str, Any] = {"tools": formatted, **kwargs}
        if tool_choice is not None:
            bound["tool_choice"] = from_langchain(tool_choice)
        if parallel_tool_calls is not None:
            bound["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(**bound)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: str = "json_schema", **kwargs: Any) -> Runnable:
        """Structured output as `response_format` json_schema, which local models decode under a grammar."""
        if method != "json_schema":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        json_schema = schema.model_json_schema() if is_model else schema
        name = json_schema.get("title", "output")
        bound = self.bind(response_format={"type": "json_schema",
                                           "json_schema": {"name": name, "schema": json_schema, "strict": True}})
        parse = RunnableLambda(lambda msg: _parse_structured(msg, schema if is_model else None))
        if include_raw:
            return bound | RunnableLambda(lambda msg: _raw_and_parsed(msg, schema if is_model else None))
        return bound | parse


def _parse_structured(msg: AIMessage, model: type[BaseModel] | None) -> Any:
    data = json.loads(msg.content if isinstance(msg.content, str) else "")
    return model.model_validate(data) if model else data


def _raw_and_parsed(msg: AIMessage, model: type[BaseModel] | None) -> dict[str, Any]:
    try:
        return {"raw": msg, "parsed": _parse_structured(msg, model), "parsing_error": None}
    except Exception as exc:  # the raw message still tells what the model said
        return {"raw": msg, "parsed": None, "parsing_error": exc}


def to_wire_message(msg: BaseMessage) -> Message:
    """A LangChain message as an OpenAI message."""
    role = ROLES.get(msg.type)
    if role is None:
        raise ValueError(f"cannot send a {msg.type!r} message to a chat model; use system, human, ai or tool messages")
    content = msg.content if isinstance(msg.content, str) else msg.content
    if isinstance(msg, AIMessage) and msg.tool_calls:
        calls = [ToolCall(id=tc.get("id") or ToolCall.model_fields["id"].default_factory(),
                          function={"name": tc["name"], "arguments": json.dumps(tc["args"])}) for tc in msg.tool_calls]
        return Message(role="assistant", content=content or None, tool_calls=calls)
    if isinstance(msg, ToolMessage):
        return Message(role="tool", content=content, tool_call_id=msg.tool_call_id)
    return Message(role=role, content=content)


def to_chat_result(resp: ChatResponse) -> ChatResult:
    """A Router response as a LangChain ChatResult (tool calls parsed, usage and call info attached)."""
    message = resp.message
    tool_calls, invalid = [], []
    for tc in message.tool_calls or []:
        try:
            tool_calls.append({"name": tc.function.name, "args": tc.parsed_arguments(), "id": tc.id, "type": "tool_call"})
        except json.JSONDecodeError as exc:
            invalid.append({"name": tc.function.name, "args": tc.function.arguments, "id": tc.id,
                            "error": str(exc), "type": "invalid_tool_call"})
    info = resp.slmswap.model_dump() if resp.slmswap else {}
    usage = resp.usage
    ai = AIMessage(
        content=message.content or "", tool_calls=tool_calls, invalid_tool_calls=invalid,
        usage_metadata={"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
                        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens},
        response_metadata={"model_name": resp.model, "finish_reason": resp.choices[0].finish_reason, "slmswap": info},
    )
    llm_output = {"model_name": resp.model, "slmswap": info,
                  "token_usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                  "total_tokens": usage.total_tokens}}
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info={"slmswap": info})], llm_output=llm_output)
