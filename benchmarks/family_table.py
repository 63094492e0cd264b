"""One table of how each model family goes through the pipeline's chat handling and training.

For every family of `tests/support/families.py` (small random-weight models with each family's own
tokenizer, special tokens and published chat template), on the date data with its system
message: what `data.system_message: auto` does with the system message, the end-of-turn
token that is trained on and stops generation, eos and pad after loading, the trained tokens
of one example and of a short training, and its first and last loss.

    .venv/bin/python benchmarks/family_table.py [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.make_data import make_examples  # noqa: E402
from tasks.config import DataParams, ModelParams, Params, TrainParams  # noqa: E402
from tasks.model.chat import encode_chat, system_handling  # noqa: E402
from tasks.model.loading import end_of_turn_token, load_base_tokenizer  # noqa: E402
from tasks.train.finetune import finetune  # noqa: E402
from tests.support.families import FAMILIES, build_family  # noqa: E402


def family_row(name: str, root: Path, steps: int) -> dict:
    folder = build_family(name, root / name)
    model = ModelParams(base=str(folder))
    tok = load_base_tokenizer(model)
    examples = make_examples(80, seed=5)
    data = root / f"{name}-prepared"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:64]))
    (data / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[64:]))
    one = encode_chat(tok, examples[0]["messages"])
    # Gemma 2 soft-caps its attention logits, which per-example packed attention does not:
    # the pipeline refuses `packed` for it and names `mask`.
    attention = "mask" if name == "gemma2" else "packed"
    params = Params(data=DataParams(), model=model, train=TrainParams(
        max_steps=steps, batch_size=4, seq_len=128, save_steps=0, log_every=1, learning_rate=0.01, attention=attention))
    summary = finetune(params, data, root / f"{name}-out", log=lambda _m: None)
    history = json.loads((root / f"{name}-out" / "history.json").read_text())
    handling = system_handling(tok, "auto")
    return {
        "family": name,
        "template": "ChatML (base model)" if FAMILIES[name].is_base else "its own",
        "system message": handling.action + (f" ({handling.reason})" if handling.reason else ""),
        "end of turn": end_of_turn_token(tok),
        "eos / pad": f"{tok.eos_token} / {tok.pad_token}",
        "trained tokens, one example": f"{one.trained_tokens} of {len(one.input_ids)}",
        "trained tokens": summary.trained_tokens,
        "loss first → last": f"{history[0]['loss']:.3f} → {history[-1]['loss']:.3f}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [family_row(name, Path(tmp), args.steps) for name in FAMILIES]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
