"""Generate the function-calling data: a user asks, the assistant calls the right tool with
the right arguments, the tool answers, and the assistant answers from the result.

OpenAI chat JSONL with `tools` beside `messages`: three small tools (`get_weather(city,
unit)`, `get_time(city)`, `convert_currency(amount, from, to)`), an assistant turn with
`tool_calls` and null content, a `tool` message with the result, and a final answer
derived from that result. The vocabulary (a few cities, currencies and phrasings) is small
enough for the tiny base model to learn the calls on a CPU; the calls and answers are
exact, so call accuracy shows whether fine-tuning worked. The output is a pure function of
the seed and the count; `data.dvc` tracks the result.

    python scripts/make_tools_data.py --out data/tools.jsonl --count 2000 --seed 11
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tasks.files import write_atomic


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


CITIES = ["Oslo", "Paris", "Tokyo", "Lima", "Cairo", "Rome", "Delhi", "Quito", "Berlin", "Madrid", "Seoul", "Dublin",
          "Nairobi", "Sydney", "Toronto", "Vienna"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "NOK"]
UNITS = ["celsius", "fahrenheit"]
SKIES = ["sunny", "cloudy", "rainy", "windy"]
TOOLS = [
    _tool("get_weather", "Current weather in a city.",
          {"city": {"type": "string"}, "unit": {"type": "string", "enum": UNITS}}, ["city", "unit"]),
    _tool("get_time", "Local time in a city.", {"city": {"type": "string"}}, ["city"]),
    _tool("convert_currency", "Convert an amount of money.",
          {"amount": {"type": "integer"}, "from": {"type": "string", "enum": CURRENCIES},
           "to": {"type": "string", "enum": CURRENCIES}}, ["amount", "from", "to"]),
]  # fmt: skip
# Units of currency per US dollar: fixed, so that every result is a function of the arguments.
RATES = {"USD": 1.0, "EUR": 0.9, "GBP": 0.8, "JPY": 150.0, "NOK": 10.5}


def _weather(rng: random.Random) -> tuple[str, dict, dict, str]:
    city, unit = rng.choice(CITIES), rng.choice(UNITS)
    ask = rng.choice(["What is the weather in {city} in {unit}?", "Weather in {city}, in {unit}."])
    celsius = rng.randint(-5, 35)
    degrees = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    sky = rng.choice(SKIES)
    result = {"temperature": degrees, "unit": unit, "sky": sky}
    return ask.format(city=city, unit=unit), {"city": city, "unit": unit}, result, f"It is {degrees} degrees {unit} and {sky} in {city}."


def _time(rng: random.Random) -> tuple[str, dict, dict, str]:
    city = rng.choice(CITIES)
    ask = rng.choice(["What time is it in {city}?", "Time in {city}?", "What is the time in {city}?"])
    time = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
    return ask.format(city=city), {"city": city}, {"time": time}, f"It is {time} in {city}."


def _currency(rng: random.Random) -> tuple[str, dict, dict, str]:
    source, target = rng.sample(CURRENCIES, 2)
    amount = rng.randint(1, 500)
    ask = rng.choice(["Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?"])
    converted = round(amount / RATES[source] * RATES[target], 2)
    result = {"amount": converted, "currency": target}
    answer = f"{amount} {source} is {converted} {target}."
    return ask.format(amount=amount, source=source, target=target), {"amount": amount, "from": source, "to": target}, result, answer


ASKS = {"get_weather": _weather, "get_time": _time, "convert_currency": _currency}


def make_tool_examples(count: int, seed: int) -> list[dict]:
    """`count` distinct examples (no question with the same result twice), the tools taken in turn."""
    rng = random.Random(seed)
    examples, seen = [], set()
    while len(examples) < count:
        name = list(ASKS)[len(examples) % len(ASKS)]
        question, arguments, result, answer = ASKS[name](rng)
        if (question, json.dumps(result)) in seen:
            continue
        seen.add((question, json.dumps(result)))
        call_id = f"call{len(examples) + 1:05d}"  # 9 alphanumeric characters, as Mistral's templates require
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        examples.append({
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
                {"role": "assistant", "content": answer},
            ],
            "tools": TOOLS,
        })  # fmt: skip
    return examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/tools.jsonl"))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in make_tool_examples(args.count, args.seed))
    write_atomic(args.out, lines)
    print(f"wrote {args.count} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
