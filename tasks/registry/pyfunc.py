"""The MLflow pyfunc model of a fine-tuned model folder, logged as code.

`tasks.registry.versions.register_candidate` logs this file itself as the model (MLflow's
"models from code": `log_model(python_model=<this file>)`), not a pickled instance, so that
loading a version runs only the project's own source, reads weights only from safetensors
files, and unpickles nothing. MLflow executes this file when it logs the model and again when it loads
it, which is why the file ends by handing MLflow the model (`mlflow.models.set_model`);
nothing else imports it.

`mlflow.pyfunc.load_model("models:/<name>@champion")` returns this model in any process
that has the project's dependencies: the folder (adapter or weights, tokenizer, and for the
tiny base the base weights too) travels as the artifact `model_dir`, and the `tasks`
package as the version's code. `predict` takes a DataFrame with a `messages` column (chat)
or a `prompt` column (plain text) and returns one completion per row.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc


class ChatModel(mlflow.pyfunc.PythonModel):
    """Greedy chat completion with the project's own prompt formatting."""

    max_new_tokens = 64

    def load_context(self, context) -> None:
        """Load the model folder (the artifact `model_dir`) with its tokenizer."""
        from tasks.model.loading import load_trained

        self.model, self.tokenizer, self.info = load_trained(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):
        """One greedy completion per row of `model_input` (`messages` or `prompt`)."""
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


# The models-from-code contract: MLflow runs this file and takes the model set here.
mlflow.models.set_model(ChatModel())
