"""A Qwen3-style chat template for the tiny tokenizer.

It renders the same text as Qwen3's own template for the features swiftray
uses, written more plainly:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{query}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>\\n

- Reasoning comes from `reasoning_content`, or from a `<think>...</think>`
  block at the start of the assistant content.
- Think blocks are shown only for assistant turns after the last real user
  query; the last assistant turn always gets one (empty if it has no
  reasoning), earlier assistant turns lose theirs.
- `add_generation_prompt` appends `<|im_start|>assistant\\n`, and with
  `enable_thinking=False` also an empty think block.
- Tools: a `# Tools` block in the system turn, `tool_calls` as
  `<tool_call>` JSON, and tool results as `<tool_response>` inside a user turn.
"""

QWEN3_CHAT_TEMPLATE = (
    # System turn, with the tool list when tools are given.
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    # Index of the last real user query (a user turn that is not just a wrapped tool response).
    "{%- set ns = namespace(last_query=messages|length - 1) %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' and m.content is string and not (m.content.startswith('<tool_response>')"
    " and m.content.endswith('</tool_response>')) %}"
    "{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}"
    "{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- content }}"
    "{%- endif %}"
    "{%- for call in (m.tool_calls or []) %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set call = call.function if call.function else call %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{{- call.arguments if call.arguments is string else (call.arguments | tojson) }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
