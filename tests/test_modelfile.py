"""The Ollama Modelfile's text per family: a Go template where the family's chat template only lays messages
out (ChatML, Llama 3, Gemma), the file's own tokenizer.chat_template (which Ollama v0.30 and later derives the
template from) where it does more (Qwen3's thinking and tools, Phi-3/4, OLMo 2, GLM-4), said in a comment."""

from __future__ import annotations

import pytest

from qroar_gguf.modelfile import FROM_FILE, modelfile_text, template_family

# The families' chat templates, cut to the parts that decide (the real ones are longer)
TEMPLATES = {
    "smollm2": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "qwen3": "{%- if tools %}<|im_start|>system\n# Tools{%- endif %}{%- for message in messages %}<|im_start|>"
             "{{ message.role }}{%- if '</think>' in content %}<think>\n{%- endif %}{%- endfor %}",
    "llama3": "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}",
    "gemma3": "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
              "messages[0]['content'] + '\n\n' -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' }}",
    "phi4": "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>' + message['content'] + "
            "'<|end|>'}}{% endif %}{% endfor %}",
    "olmo2": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\n' + "
             "message['content'] + '\n' }}{% endif %}{% endfor %}",
    "glm4": "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具{%- endif -%}{%- for msg in messages %}"
            "<|{{ msg.role }}|>\n{{ msg.content }}{%- endfor %}",
}
EXPECTED = {"smollm2": "chatml", "qwen3": None, "llama3": "llama3", "gemma3": "gemma", "phi4": None, "olmo2": None,
            "glm4": None}
STOPS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


@pytest.mark.parametrize("model", list(TEMPLATES))
def test_each_family_gets_a_go_template_or_the_files_own(model: str):
    family = template_family(TEMPLATES[model])
    assert family == EXPECTED[model]
    text = modelfile_text("./m.gguf", 65536, TEMPLATES[model])
    lines = text.splitlines()
    assert lines[:2] == ["FROM ./m.gguf", "PARAMETER num_ctx 65536"]
    if family is None:
        assert lines[2:] == [FROM_FILE] and "TEMPLATE" not in text
    else:
        assert lines[2].startswith('TEMPLATE """') and text.count('"""') == 2
        assert f'PARAMETER stop "{STOPS[family]}"' in lines
        assert "{{ .Content }}" in text and "{{- range .Messages }}" in text


def test_go_templates_end_with_the_assistants_turn():
    assert modelfile_text("m", 8, TEMPLATES["smollm2"]).endswith('<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\n')
    assert '<start_of_turn>model\n"""' in modelfile_text("m", 8, TEMPLATES["gemma3"])
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n"""' in modelfile_text("m", 8, TEMPLATES["llama3"])


def test_gemma_puts_the_system_message_into_the_first_user_turn():
    """Gemma has no system role: its template, like Ollama's, prefixes the first user message with it."""
    text = modelfile_text("m", 8, TEMPLATES["gemma3"])
    assert '{{ $system = .Content }}' in text and "<start_of_turn>system" not in text


def test_no_template_no_line():
    assert modelfile_text("m", 8, None) == "FROM m\nPARAMETER num_ctx 8\n"
