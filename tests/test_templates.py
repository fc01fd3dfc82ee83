"""Chat templates: GGUF-embedded jinja templates and per-architecture fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_registry import write_gguf

from infernod.backends.gguf_meta import ModelInfo, read_gguf_info
from infernod.backends.templates import GEMMA_TEMPLATE, render_chat, template_name_for
from infernod.protocol.errors import InfernoError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


def _info(arch: str, template: str | None = None, bos: str | None = None) -> ModelInfo:
    return ModelInfo(name="m", kind="gguf", path=Path("m.gguf"), size_bytes=1, mtime=0.0,
                     architecture=arch, chat_template=template, bos_token=bos,
                     eos_token="<eos>")  # fmt: skip


def test_gemma_fallback_folds_system_and_uses_model_turns() -> None:
    prompt, name = render_chat(_info("gemma3", bos="<bos>"), CHAT)
    assert name == "gemma"
    assert prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )  # no leading <bos>: the engine's tokenizer adds it
    no_gen, _ = render_chat(_info("gemma2"), CHAT[:2], add_generation_prompt=False)
    assert no_gen == "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"


def test_gemma_fallback_rejects_non_alternating_roles() -> None:
    with pytest.raises(InfernoError) as e:
        render_chat(_info("gemma3"), [{"role": "user", "content": "a"}] * 2)
    assert e.value.code == "bad_request" and "alternate" in e.value.message


def test_fallbacks_by_architecture() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    llama, name = render_chat(_info("llama"), msgs)
    assert name == "llama3"
    assert llama == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for arch in ["qwen2", "phi3", None]:
        prompt, name = render_chat(_info(arch), msgs)  # type: ignore[arg-type]
        assert name == "chatml"
        assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_embedded_gguf_template_is_used(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}]{{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    info = read_gguf_info("t", write_gguf(tmp_path / "t.gguf", arch="gemma3", template=template))
    assert template_name_for(info) == "gguf"
    prompt, name = render_chat(info, [{"role": "user", "content": "hé"}])
    assert name == "gguf"
    assert prompt == "[USER]hé<t2>[ASSISTANT]"  # bos <t1> stripped, eos <t2> from the vocab


def test_embedded_official_gemma_template_matches_fallback() -> None:
    embedded = _info("gemma3", template=GEMMA_TEMPLATE, bos="<bos>")
    assert render_chat(embedded, CHAT)[0] == render_chat(_info("gemma3", bos="<bos>"), CHAT)[0]


def test_template_helpers_like_transformers() -> None:
    text = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
    prompt, name = render_chat(text, [{"role": "user", "content": "ü"}])
    assert name == "custom"
    assert prompt == '[{"role": "user", "content": "ü"}]|4'


def test_text_parts_are_joined() -> None:
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert render_chat(None, msgs)[0].startswith("<|im_start|>user\nab<|im_end|>")


@pytest.mark.parametrize(
    ("template", "messages", "fragment"),
    [
        ("{% for %}", [{"role": "user", "content": "x"}], "does not compile"),
        ("{{ raise_exception('no system') }}", [{"role": "user", "content": "x"}], "no system"),
        ("{{ ''.__class__.__mro__ }}", [{"role": "user", "content": "x"}], "failed"),
        ("{{ messages }}", [], "non-empty"),
        ("{{ messages }}", [{"role": "user"}], "content"),
        ("{{ messages }}", [{"content": "x"}], "role"),
    ],
)
def test_bad_templates_and_messages_are_bad_requests(template, messages, fragment) -> None:
    with pytest.raises(InfernoError) as e:
        render_chat(template, messages)
    assert e.value.code == "bad_request"
    assert fragment in e.value.message


def test_sandbox_blocks_attribute_escape() -> None:
    with pytest.raises(InfernoError):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])
