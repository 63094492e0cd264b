"""FineTuningLLM: retrain, gate, register and serve fine-tuned language models."""
