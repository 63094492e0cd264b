"""The MLflow pyfunc wrapper of a fine-tuned model folder.

`mlflow.pyfunc.load_model("models:/<name>@champion")` returns this model in any process
that has the project's dependencies: the folder (adapter or weights, tokenizer, and for the
tiny base the base weights too) travels as an MLflow artifact, and this package as code.
`predict` takes a DataFrame with a `messages` column (chat) or a `prompt` column (plain
text) and returns one completion per row.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc


class ChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat completion with the project's own prompt formatting."""

    max_new_tokens = 64

    def load_context(self, context) -> None:
        from tasks.model.loading import load_trained

        self.model, self.tokenizer, self.info = load_trained(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):
        from tasks.evaluate.generation import generate_batched
        from tasks.model.chat import render_prompt

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        prompts = [
            render_prompt(self.tokenizer, r["messages"], self.info.get("system_message", "auto"))
            if "messages" in r else str(r["prompt"])
            for r in rows
        ]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        outputs, _, _ = generate_batched(self.model, self.tokenizer, prompts, max_new, batch_size=16)
        return outputs
