"""An Ollama Modelfile for a GGUF: ``FROM`` the file, ``num_ctx`` its context, and its chat template.

Ollama caps ``num_ctx`` by the file's context length and runs llama.cpp's llama-server for a GGUF, so
the extended context works once the file says so and the Modelfile asks for it. A template in
ChatML form (``<|im_start|>``; Qwen, SmolLM2 and many more) is written in Ollama's Go template syntax;
for any other, Ollama derives the template from the file's ``tokenizer.chat_template`` itself.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n'
    '{{ .Content }}<|im_end|>\n'
    '{{ end }}<|im_start|>assistant\n'
)


def modelfile_text(gguf_path: Path, num_ctx: int, chat_template: str | None) -> str:
    lines = [f"FROM {gguf_path}", f"PARAMETER num_ctx {int(num_ctx)}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
    elif chat_template:
        lines.append("# the chat template: Ollama reads it from the file's tokenizer.chat_template")
    return "\n".join(lines) + "\n"
