"""What a registered model version takes: typed chat requests, and the example stored with it.

The pyfunc model (`tasks/registry/pyfunc.py`) types its `predict` with `ChatRequest`, so
MLflow derives the version's signature from the type hint and checks every input against it:
a malformed request is refused with the field at fault. `INPUT_EXAMPLE` is the version's input
example (a request, and the generation parameters as MLflow params); MLflow stores it beside
the model, with the HTTP body that `mlflow models serve` takes, and infers the params' schema
from it. A module of its own, with no side effects, so that registering a version
(`tasks.registry.versions`) can read the example without executing the model's code.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

MAX_NEW_TOKENS = 64  # the default of the `max_new_tokens` param


class ChatMessage(BaseModel):
    """One turn of the conversation."""

    role: str = Field(description="system, user or assistant")
    content: str = Field(description="the turn's text")


class ChatRequest(BaseModel):
    """One completion to make: a conversation (`messages`) or, for plain text, a `prompt`."""

    messages: list[ChatMessage] | None = Field(None, description="the conversation; the model answers its last turn")
    prompt: str | None = Field(None, description="plain text to continue, as is (no chat template)")

    @model_validator(mode="after")
    def _one_of(self) -> ChatRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either `messages` (a chat) or `prompt` (plain text), not both or neither")
        return self


INPUT_EXAMPLE = (
    [{"messages": [{"role": "system", "content": "Rewrite the ISO date in words."},
                   {"role": "user", "content": "2001-02-03"}]}],
    {"max_new_tokens": MAX_NEW_TOKENS},
)
