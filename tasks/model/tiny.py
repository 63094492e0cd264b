"""The `tiny` base model: a small Llama and a byte-level BPE tokenizer with a chat template.

No machine of this project reaches a model hub, so the default base model is built here,
deterministically from a seed, and cached as an ordinary Hugging Face model directory
(`config.json`, `model.safetensors`, `tokenizer.json`, chat template). Everything that
loads a base model goes through `from_pretrained` on that directory, exactly as it would
for a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.files import publish_folder

# The chat template follows ChatML; `<|im_end|>` ends each turn and is the eos token, so
# generation stops at the end of the assistant's answer. Tools are declared in the system
# turn as a TypeScript namespace, the compact form of OpenAI's harmony format (gpt-oss):
# a `// description` line, then `type name = (_: {...}) => any;` with one property a line,
# `?` after an optional one, an enum as a union of its JSON literals and a property's
# description as a comment before it. A tool this form cannot hold whole (nested objects,
# arrays, anyOf, keywords such as `default` or `minimum`, extra keys) is declared as its
# JSON on one line, so no part of a schema is dropped. The declaration is about half the
# tokens of the tools' JSON, which a 2-layer model attends over before every question
# (benchmarks/results/tools_tiny.md). Calls keep Qwen 2.5's (Hermes) format, which many
# tool-calling data sets and parsers know: <tool_call> JSON in the assistant turn, the
# results as a user turn of <tool_response> blocks; a reasoning trace is a <think> block
# before the answer (in every turn: none is dropped). Without tools, tool calls or
# reasoning it renders plain ChatML, as it always did.
CHAT_TEMPLATE = (
    # A tool's declaration in the namespace, or its JSON where the compact form cannot hold it all.
    "{%- macro declare(tool) %}"
    "{%- set ns = namespace(ok=tool is mapping and tool.type == 'function' and tool.function is mapping) %}"
    "{%- if ns.ok %}"
    "{%- set f = tool.function %}"
    "{%- for key in tool %}{%- if key not in ['type', 'function'] %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- for key in f %}{%- if key not in ['name', 'description', 'parameters'] %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- set ns.ok = ns.ok and f.name is string and (f.description is not defined or f.description is string) %}"
    # Names are written bare only where they are identifiers (`my-key` or `a})=>x` would break the declaration).
    "{%- set word = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789' %}"
    "{%- if ns.ok %}{%- for c in f.name %}{%- if c not in word %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- set ns.ok = ns.ok and f.name and f.name[0] not in '0123456789' %}{%- endif %}"
    "{%- set p = f.parameters if f.parameters is defined else {} %}"
    "{%- set ns.ok = ns.ok and p is mapping %}"
    "{%- if ns.ok %}"
    "{%- for key in p %}{%- if key not in ['type', 'properties', 'required'] %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- set props = p.properties if p.properties is defined else {} %}"
    "{%- set required = p.required if p.required is defined else [] %}"
    "{%- set ns.ok = ns.ok and (p.type is not defined or p.type == 'object') and props is mapping"
    " and required is sequence and required is not string and required is not mapping %}"
    "{%- endif %}"
    "{%- if ns.ok %}"
    "{%- for r in required %}{%- if r is not string or r not in props %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- for name, prop in props.items() %}"
    "{%- if not (name is string and name and name[0] not in '0123456789' and prop is mapping) %}{%- set ns.ok = false %}"
    "{%- else %}"
    "{%- for c in name %}{%- if c not in word %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- for key in prop %}{%- if key not in ['type', 'enum', 'description'] %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- if prop.description is defined and prop.description is not string %}{%- set ns.ok = false %}{%- endif %}"
    "{%- if prop.enum is defined %}"
    "{%- if not (prop.enum is sequence and prop.enum is not string and prop.enum is not mapping and prop.enum | length > 0) %}"
    "{%- set ns.ok = false %}"
    "{%- elif prop.type is defined %}"
    "{%- if prop.type != 'string' %}{%- set ns.ok = false %}{%- endif %}"
    "{%- for v in prop.enum %}{%- if v is not string %}{%- set ns.ok = false %}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- elif prop.type not in ['string', 'integer', 'number', 'boolean', 'null'] %}{%- set ns.ok = false %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- if ns.ok %}"
    "{%- if f.description %}{{- '// ' + f.description.replace('\\n', '\\n// ') + '\\n' }}{%- endif %}"
    "{{- 'type ' + f.name + ' = (' }}"
    "{%- if props %}"
    "{{- '_: {\\n' }}"
    "{%- for name, prop in props.items() %}"
    "{%- if prop.description %}{{- '// ' + prop.description.replace('\\n', '\\n// ') + '\\n' }}{%- endif %}"
    "{{- name + ('' if name in required else '?') + ': ' }}"
    "{%- if prop.enum is defined %}{{- prop.enum | map('tojson') | join(' | ') }}{%- else %}{{- prop.type }}{%- endif %}"
    "{{- ',\\n' }}"
    "{%- endfor %}"
    "{{- '}' }}"
    "{%- endif %}"
    "{{- ') => any;\\n' }}"
    "{%- else %}"
    "{{- tool | tojson + '\\n' }}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\nnamespace functions {\\n' }}"
    "{%- for tool in tools %}{{- declare(tool) }}{%- endfor %}"
    "{{- '}\\nCall a function as <tool_call>\\n{\"name\": ..., \"arguments\": {...}}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' and (message.tool_calls or message.reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|bos|>"]

# A fixed corpus for the BPE merges: the tokenizer is the same on every machine. Its words
# cover dates, numbers and common English so that typical chat text gets short encodings,
# and the tool format: the namespace declaration's syntax (on placeholder names), the JSON
# of tool schemas and calls, and the words of the built-in function-calling task
# (scripts/make_tools_data.py). Without them a tool example, its schemas and its call are
# split almost into bytes, into more than twice as many tokens (benchmarks/results/tools_tiny.md).
_MONTHS = "January February March April May June July August September October November December"
_CORPUS = [
    _MONTHS,
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "system user assistant Rewrite the date in words. Convert this ISO date:",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31",
    "1990 1999 2000 2001 2010 2020 2023 2024 2025 2026 - : , . ? ! ( ) ' \"",
    "the of and to in is you that it he was for on are as with his they at be this have from",
    "or one had by word but not what all were we when your can said there use an each which",
    "she do how their if will up other about out many then them these so some her would make",
    "Answer the question. Classify the sentiment. Summarize the text. Translate to French.",
]
# Words of the tool format and of the function-calling task. JSON writes a value without
# the space before it (`"city": "Oslo"`), prose with one (`in Oslo`); the byte-level
# pre-tokenizer keeps the two apart, so each word is given in both forms.
_TOOL_WORDS = (
    "get_weather get_time convert_currency city unit amount from to celsius fahrenheit temperature sky currency time "
    "Oslo Paris Tokyo Lima Cairo Rome Delhi Quito Berlin Madrid Seoul Dublin Nairobi Sydney Toronto Vienna "
    "USD EUR GBP JPY NOK sunny cloudy rainy windy degrees weather Weather Time Convert How much user assistant "
    "type function name description parameters object properties required string integer number boolean array enum "
    "arguments " + _MONTHS
).split()
_TOOL_CORPUS = [
    "# Tools\nnamespace functions {\n// A function.\ntype f = () => any;\n}\n",
    "type f = (_: {\n// A property.\nname: string,\ncount?: integer,\nscore?: number,\nflag?: boolean,\nnone?: null,\n}) => any;\n",
    'kind: "a" | "b" | "c",\nkind?: "a" | "b",\n',
    'Call a function as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>',
    ('<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_response>\n{"time": "20:03"}\n'
    "</tool_response>"),
    ('{"type": "function", "function": {"name": "", "description": "", "parameters": {"type": "object", "properties": '
    '{"": {"type": "string"}, "": {"type": "integer"}}, "required": ["", ""]}}}'),
    " ".join(_TOOL_WORDS),
    " ".join(f'"{w}"' for w in _TOOL_WORDS),
    " ".join(f"{i:02d}" for i in range(100)),
    " ".join(str(i) for i in range(100)),
    "Current weather in a city. Local time in a city. Convert an amount of money.",
    "What is the weather in Weather in What time is it in Time in What is the time in Convert How much is It is",
]
VOCAB_SIZE = 1024  # the corpus yields about 970 tokens: room for all its merges


# The standard deviation of the random weights, as a function of the width: 1/sqrt(width),
# the fan-in scale. transformers' Llama default (0.02) suits widths in the thousands; at the
# tiny width it leaves every attention score near zero, so attention starts uniform over
# the context, and a model that must find one word of a long prompt (a city named in a
# question behind a tool declaration) hardly learns to: 320 full-batch steps on five tool
# conversations still wrote one city for another, while at a scale of 0.1 the same steps
# learnt both (benchmarks/results/tools_tiny.md).
INIT_RULE = "std = width ** -0.5"


def init_std(hidden_size: int) -> float:
    """The standard deviation of the tiny model's random weights (`INIT_RULE`)."""
    return hidden_size ** -0.5


def tokenizer_digest() -> str:
    """A short digest of what the tiny model is built from besides its seed and shape (chat
    template, corpus, vocabulary size, the rule of its random weights).

    It names the cached folders: one built before any of these changed is not reused.
    """
    import hashlib

    recipe = json.dumps([CHAT_TEMPLATE, _CORPUS, _TOOL_CORPUS, VOCAB_SIZE, INIT_RULE])
    return hashlib.sha256(recipe.encode()).hexdigest()[:8]


def train_byte_level_bpe(special_tokens: list, vocab_size: int, corpus: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus`, deterministically.

    Args:
        special_tokens: strings or `tokenizers.AddedToken`s, given the first ids in order.
        vocab_size: the vocabulary to train up to (specials and the 256 bytes included).
        corpus: the texts the merges are learnt from.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


def _build_tokenizer(vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    tok = train_byte_level_bpe(SPECIAL_TOKENS, vocab_size, _CORPUS + _TOOL_CORPUS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(out_dir: Path, seed: int, hidden_size: int = 128, layers: int = 2, heads: int = 4) -> Path:
    """Build the tiny base model into `out_dir` (idempotent; written atomically).

    Args:
        out_dir: the model directory to create.
        seed: seed of the random weights.
        hidden_size, layers, heads: shape of the Llama decoder.

    Returns:
        `out_dir`, a directory that `AutoModelForCausalLM.from_pretrained` loads.
    """
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(vocab_size=VOCAB_SIZE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std(hidden_size),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "tiny.json").write_text(
            json.dumps({"seed": seed, "hidden_size": hidden_size, "layers": layers, "heads": heads}, indent=2)
        )

    return publish_folder(out_dir, fill)
