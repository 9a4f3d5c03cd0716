"""The OpenAI request shapes Nebula validates, and the response shapes it emits.

Requests are validated with msgspec (type errors name the offending field) but
forwarded as the original bytes, so fields Nebula does not know (``tools``,
``response_format``, vendor extensions) reach the engine untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Role
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    tool_call_id: str | None = None

    def problem(self) -> tuple[str, str] | None:
        """(field, message) for what the OpenAI API would reject, else None."""
        if self.content is None:
            if self.role == "assistant" and (self.tool_calls or self.function_call):
                return None
            return "content", f"a {self.role} message needs content"
        if self.role == "tool" and not self.tool_call_id:
            return "tool_call_id", "a tool message needs tool_call_id"
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    return f"content[{i}]", "a content part is an object with a string `type`"
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    return f"content[{i}].text", "a text part needs a string `text`"
        return None


# Choices per request: the OpenAI API's bound. Engines that sample once per request
# (sim, hf) answer n > 1 with their own 400; vLLM serves it.
ChoiceCount = Annotated[int, msgspec.Meta(ge=1, le=128)]


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: ChoiceCount = 1
    temperature: Temperature | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def problem(self) -> tuple[str, str] | None:
        """(param, message) for a message the OpenAI API would reject, else None."""
        for i, m in enumerate(self.messages):
            found = m.problem()
            if found is not None:
                return f"messages[{i}].{found[0]}", found[1]
        return None


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | list[str | int | list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    n: ChoiceCount = 1
    temperature: Temperature | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def limit(self) -> int | None:
        return self.max_tokens

    def limit_param(self) -> str:
        return "max_tokens"

    def problem(self) -> tuple[str, str] | None:
        return None


class StreamFlags(msgspec.Struct, kw_only=True):
    """The fields a worker needs to frame and bound a job; decoding skips everything else."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str = ""  # a LoRA adapter's name, where it is not the worker's model
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "nebula"


class AdapterModel(Model, kw_only=True):
    """A LoRA adapter in /v1/models, with vLLM's fields: its path and its base model."""

    root: str
    parent: str


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Model] = msgspec.field(default_factory=list)


SSE_DONE = b"data: [DONE]\n\n"


def sse(chunk: bytes) -> bytes:
    return b"data: " + chunk + b"\n\n"


# --- embeddings -------------------------------------------------------------------

# OpenAI's own limit on inputs per embeddings request.
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # Optional here: a batch item names its model by subject; the gateway requires it.
    model: str = ""
    # A string, strings, one token array or token arrays (msgspec takes one list type).
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None

    def count(self) -> int:
        if isinstance(self.input, str):
            return 1
        if self.input and all(isinstance(x, int) for x in self.input):
            return 1  # one token array
        return len(self.input)

    def texts(self) -> list[str] | None:
        """The inputs as strings, or None when they are token arrays."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(x, str) for x in self.input):
            return list(self.input)  # type: ignore[arg-type]
        return None
