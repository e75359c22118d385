"""An Ollama Modelfile for a GGUF: ``FROM`` the file, ``num_ctx`` its context, and its chat template.

Ollama caps ``num_ctx`` by the file's context length and runs llama.cpp's llama-server for a GGUF, so
the extended context works once the file says so and the Modelfile asks for it.

The template, decided per family from the file's ``tokenizer.chat_template``:

- plain ChatML (``<|im_start|>``: SmolLM2, Qwen2, and many more) and Llama 3's header format are written
  in Ollama's Go template syntax, with their stop tokens: their Jinja templates only lay messages out, so the
  Go form says the same;
- Gemma (``<start_of_turn>``) is written too: it has no system role, and Ollama's template, like Gemma's own,
  puts a system message into the first user turn;
- everything else is left to the file: Qwen3's template (``<think>`` blocks dropped from earlier turns, tool
  calls), Phi-3/4, OLMo 2 and GLM-4's (``[gMASK]``, their own role tokens, tools) do more than a Go template
  re-written by hand should guess at, and Ollama since v0.30 derives the template from the file's
  ``tokenizer.chat_template`` itself. The Modelfile says so in a comment.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n'
    '{{ .Content }}<|im_end|>\n'
    '{{ end }}<|im_start|>assistant\n'
)
LLAMA3_TEMPLATE = (
    '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    '{{ .Content }}<|eot_id|>'
    '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n'
)
GEMMA_TEMPLATE = (
    '{{- $system := "" }}'
    '{{- range .Messages }}'
    '{{- if eq .Role "system" }}{{ $system = .Content }}'
    '{{- else if eq .Role "user" }}<start_of_turn>user\n'
    '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
    '{{- else if eq .Role "assistant" }}<start_of_turn>model\n'
    '{{ .Content }}<end_of_turn>\n'
    '{{- end }}'
    '{{- end }}<start_of_turn>model\n'
)

#: family -> (a marker its chat template holds, markers that make it more than a layout, Go template, stops)
GO_TEMPLATES: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "chatml": ("<|im_start|>", ("<think>", "tool_call", "tools"), CHATML_TEMPLATE, ("<|im_end|>",)),
    "llama3": ("<|start_header_id|>", ("tools", "ipython"), LLAMA3_TEMPLATE, ("<|eot_id|>",)),
    "gemma": ("<start_of_turn>", ("tools", "tool_call"), GEMMA_TEMPLATE, ("<end_of_turn>",)),
}
FROM_FILE = "# the chat template: Ollama (v0.30 and later) derives it from the file's tokenizer.chat_template"


def template_family(chat_template: str | None) -> str | None:
    """The family whose Go template is written for ``chat_template``; None: left to the file."""
    if not chat_template:
        return None
    for family, (marker, beyond, _, _) in GO_TEMPLATES.items():
        if marker in chat_template:
            return None if any(b in chat_template for b in beyond) else family
    return None


def modelfile_text(gguf_path, num_ctx: int, chat_template: str | None) -> str:
    lines = [f"FROM {gguf_path}", f"PARAMETER num_ctx {int(num_ctx)}"]
    family = template_family(chat_template)
    if family is not None:
        _, _, template, stops = GO_TEMPLATES[family]
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    elif chat_template:
        lines.append(FROM_FILE)
    return "\n".join(lines) + "\n"
