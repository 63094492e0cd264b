"""The MLflow pyfunc model of a fine-tuned model folder, logged as code.

`tasks.registry.versions.register_candidate` logs this file itself as the model (MLflow's
"models from code": `log_model(python_model=<this file>)`), not a pickled instance, so that
loading a version runs only the project's own source, reads weights only from safetensors
files, and unpickles nothing. MLflow executes this file when it logs the model and again when
it loads it, which is why the file ends by handing MLflow the model (`mlflow.models.set_model`);
nothing else imports it.

`mlflow.pyfunc.load_model("models:/<name>@champion")` returns this model in any process
that has the project's dependencies: the folder (adapter or weights, tokenizer, and for the
tiny base the base weights too) travels as the artifact `model_dir`, and the `tasks`
package as the version's code.

`predict` is typed (`tasks.registry.chat_schema.ChatRequest`): MLflow derives the version's
signature from the type hint and checks every input against it. The model answers, one
greedy completion per request,

- a list of requests, `[{"messages": [...]}]` (or `{"prompt": "..."}` for plain text);
- a DataFrame with a `messages` (or `prompt`) column, one request per row;
- one chat request, `{"messages": [...]}`: the body MLflow's scoring server passes on
  unwrapped for chat models (`mlflow models serve`);

with the generation parameters as MLflow params (`max_new_tokens`).
"""

from functools import wraps
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc

from tasks.registry.chat_schema import MAX_NEW_TOKENS, ChatRequest


def _one_request_or_rows(predict):
    """Let `predict` take one chat request (a dict) as well as a list of them.

    MLflow's scoring server hands a body `{"messages": [...]}` to the model as that dict;
    the type-hint check MLflow wraps `predict` in wants a list, so the dict becomes a list of
    one here, before that check.
    """

    @wraps(predict)
    def accepting(self, model_input, params=None):
        if isinstance(model_input, dict):
            model_input = [model_input]
        return predict(self, model_input, params=params)

    return accepting


class ChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat completion with the project's own prompt formatting."""

    def load_context(self, context) -> None:
        """Load the model folder (the artifact `model_dir`) with its tokenizer."""
        from tasks.model.loading import load_trained

        self.model, self.tokenizer, self.info = load_trained(Path(context.artifacts["model_dir"]))

    def predict(self, model_input: list[ChatRequest], params: dict[str, Any] | None = None) -> list[str]:
        """One greedy completion per request, at most `params["max_new_tokens"]` tokens long."""
        from tasks.evaluate.generation import generate_batched
        from tasks.model.chat import render_prompt

        policy = self.info.get("system_message", "auto")
        prompts = [render_prompt(self.tokenizer, [m.model_dump() for m in r.messages], policy) if r.messages is not None
                   else r.prompt for r in model_input]
        max_new = int((params or {}).get("max_new_tokens") or MAX_NEW_TOKENS)
        outputs, _, _ = generate_batched(self.model, self.tokenizer, prompts, max_new, batch_size=16)
        return outputs


# After the class is made: PythonModel wraps the `predict` a subclass defines in MLflow's
# type-hint check, and a dict must become a list before that check sees it.
ChatModel.predict = _one_request_or_rows(ChatModel.predict)

# The models-from-code contract: MLflow runs this file and takes the model set here.
mlflow.models.set_model(ChatModel())
