"""Small random-weight models of real families, each saved as a local model folder.

Every family gets its real architecture class (hidden size 64, 2 layers, a few hundred
thousand parameters), its own byte-level BPE tokenizer trained deterministically on a
fixed corpus with the family's real special tokens, bos/eos/pad settings and generation
stop tokens, and the chat template published in the family's `tokenizer_config.json`
(none for the base models GPT-2 and GPT-NeoX). Tests load these folders exactly as they
would a downloaded checkpoint, so the code under test meets each family's quirks: a BOS
written by the template, a system role that raises, a system message moved into the
last user turn, an end-of-turn token that is not the eos token, no pad token at all.

Use the session fixture `family_models` (a plugin of the whole suite, see tests/conftest.py),
which builds each family once per test session:

    def test_loads(family_models):
        path = family_models("llama3")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks.files import publish_folder

# Published chat templates, verbatim (as in each model's tokenizer_config.json).

# meta-llama/Meta-Llama-3-8B-Instruct: the template writes bos_token itself, and every
# message is a header block ending in <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct: a system header always (with the knowledge and today's
# date), tools in the first user message, one JSON tool call per assistant turn, and tool
# results in the ipython role.
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-0.5B-Instruct: ChatML with a default system message and tool calls.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B: ChatML with thinking; the last assistant turn after the last user
# query gets a <think> block, and `enable_thinking=False` writes an empty one.
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# mistralai/Mistral-7B-Instruct-v0.3: roles must alternate after an optional system
# message, and the system message goes into the LAST user turn only.
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# google/gemma-2-2b-it: no system role (it raises), the assistant is "model", and turns
# end with <end_of_turn>, which is not the tokenizer's eos token.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct: turns end with <|end|>; the eos token <|endoftext|>
# closes a conversation rendered without a generation prompt.
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

HIDDEN, LAYERS, HEADS = 64, 2, 4


@dataclass(frozen=True)
class Family:
    """What a family's model folder holds besides random weights.

    Attributes:
        name: the key in FAMILIES.
        published: the model whose template and token settings this family copies.
        architecture: the transformers class of the model.
        special_tokens: the family's special tokens (added first, so they get the lowest ids).
        bos, eos, pad, unk: the tokenizer's token settings (None: the family has none).
        add_bos: the tokenizer's post-processor puts bos before every encoding.
        stop_tokens: the model's `generation_config.eos_token_id` (as tokens).
        chat_template: the published template; None for a base model.
        config: the architecture's settings beyond the shared small shape.
        rstrip_tokens: special tokens that swallow the whitespace after them (Phi-3's role tokens).
        plain_tokens: added tokens that are not special (Qwen 3's <think> tags).
        tied: whether the LM head shares the input embedding.
    """

    name: str
    published: str
    architecture: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    add_bos: bool
    stop_tokens: tuple[str, ...]
    chat_template: str | None
    config: dict = field(default_factory=dict)
    rstrip_tokens: tuple[str, ...] = ()
    plain_tokens: tuple[str, ...] = ()
    tied: bool = False

    @property
    def is_base(self) -> bool:
        """A base model: no chat template (and no pad token)."""
        return self.chat_template is None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3", "meta-llama/Meta-Llama-3-8B-Instruct", "LlamaForCausalLM",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, add_bos=True,
            stop_tokens=("<|end_of_text|>", "<|eot_id|>"), chat_template=LLAMA3_TEMPLATE,
            config={"num_key_value_heads": 2, "rope_theta": 500000.0},
        ),
        Family(
            "llama3.1", "meta-llama/Llama-3.1-8B-Instruct", "LlamaForCausalLM",
            ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|eom_id|>", "<|python_tag|>"),
            bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, add_bos=True,
            stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), chat_template=LLAMA31_TEMPLATE,
            config={"num_key_value_heads": 2, "rope_theta": 500000.0},
        ),
        Family(
            "qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, add_bos=False,
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=QWEN25_TEMPLATE,
            config={"num_key_value_heads": 2}, tied=True,
        ),
        Family(
            "qwen3", "Qwen/Qwen3-0.6B", "Qwen3ForCausalLM",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, add_bos=False,
            stop_tokens=("<|im_end|>", "<|endoftext|>"), chat_template=QWEN3_TEMPLATE,
            config={"num_key_value_heads": 2, "head_dim": HIDDEN // HEADS}, plain_tokens=("<think>", "</think>"),
            tied=True,
        ),
        Family(
            "mistral", "mistralai/Mistral-7B-Instruct-v0.3", "MistralForCausalLM",
            ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
             "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
            bos="<s>", eos="</s>", pad=None, unk="<unk>", add_bos=True,
            stop_tokens=("</s>",), chat_template=MISTRAL_V03_TEMPLATE,
            config={"num_key_value_heads": 2, "sliding_window": None},
        ),
        Family(
            "gemma2", "google/gemma-2-2b-it", "Gemma2ForCausalLM",
            ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
            stop_tokens=("<eos>", "<end_of_turn>"), chat_template=GEMMA2_TEMPLATE,
            config={"num_key_value_heads": 2, "head_dim": HIDDEN // HEADS, "query_pre_attn_scalar": HIDDEN // HEADS,
                    "sliding_window": 4096},
            tied=True,
        ),
        Family(
            "phi3", "microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM",
            ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
            bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", add_bos=False,
            stop_tokens=("<|endoftext|>", "<|assistant|>", "<|end|>"), chat_template=PHI3_TEMPLATE,
            rstrip_tokens=("<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
        ),
        Family(
            "gpt2", "openai-community/gpt2", "GPT2LMHeadModel", ("<|endoftext|>",),
            bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>", add_bos=False,
            stop_tokens=("<|endoftext|>",), chat_template=None, tied=True,
        ),
        Family(
            "neox", "EleutherAI/pythia-70m", "GPTNeoXForCausalLM", ("<|endoftext|>",),
            bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>", add_bos=False,
            stop_tokens=("<|endoftext|>",), chat_template=None, config={"rotary_pct": 0.25},
        ),
    )
}

# The fixed corpus the BPE merges are learned from: every family's tokenizer is the same
# on every machine. It covers the words of the project's date data and of chat turns.
_CORPUS = [
    "January February March April May June July August September October November December",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "system user assistant model Rewrite the ISO date in words. Convert this ISO date:",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31",
    "1950 1990 1999 2000 2001 2010 2016 2020 2023 2024 2025 2041 - : , . ? ! ( ) ' \"",
    "the of and to in is you that it he was for on are as with his they at be this have from",
    "You are a helpful assistant. Answer the question. Classify the sentiment. Summarize the text.",
]
_VOCAB_SIZE = 400


def _tokenizer(family: Family):
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    from tasks.model.tiny import train_byte_level_bpe

    specials = [AddedToken(t, special=True, normalized=False, rstrip=t in family.rstrip_tokens)
                for t in family.special_tokens]
    tok = train_byte_level_bpe(specials, _VOCAB_SIZE, _CORPUS)
    if family.plain_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_tokens])
    if family.add_bos:
        # As Llama 3's tokenizer.json: encodings start with bos unless add_special_tokens=False.
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if family.chat_template is not None:
        fast.chat_template = family.chat_template
    return fast


def _config(family: Family, tokenizer):
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) if tok else None
           for name, tok in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad))}
    stops = [tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens]
    shared = {
        "vocab_size": len(tokenizer),
        "bos_token_id": ids["bos"],
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        "pad_token_id": ids["pad"],
        "tie_word_embeddings": family.tied,
    }
    if family.architecture == "GPT2LMHeadModel":
        shape = {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 1024}
    else:
        shape = {
            "hidden_size": HIDDEN, "intermediate_size": HIDDEN * 2, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "max_position_embeddings": 2048,
        }
    config_class = getattr(transformers, family.architecture.replace("ForCausalLM", "Config")
                           .replace("GPT2LMHeadModel", "GPT2Config"))
    return config_class(**shape, **shared, **family.config), stops


def build_family(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Build family `name`'s small model folder into `out_dir` (idempotent; written atomically).

    Args:
        name: a key of FAMILIES.
        out_dir: the model folder to create.
        seed: seed of the random weights.

    Returns:
        `out_dir`, which `AutoModelForCausalLM` and `AutoTokenizer` load with `from_pretrained`.
    """
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    import torch
    import transformers

    family = FAMILIES[name]
    tokenizer = _tokenizer(family)
    config, stops = _config(family, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, family.architecture)(config)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = config.pad_token_id

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "family.json").write_text(json.dumps({"family": name, "published": family.published, "seed": seed}))

    return publish_folder(out_dir, fill)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> Callable[[str], Path]:
    """A function from a family name to its model folder, each built once per test session."""
    root = tmp_path_factory.mktemp("families")

    def get(name: str) -> Path:
        return build_family(name, root / name)

    return get
