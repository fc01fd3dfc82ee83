"""Chat templates: the model's own jinja2 template from its GGUF, or a fallback by architecture.

Rendering follows what llama.cpp's tooling and transformers provide to templates: a sandboxed
jinja2 environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, the
``raise_exception`` and ``strftime_now`` globals, a ``tojson`` filter that keeps non-ASCII,
and ``bos_token``/``eos_token`` variables. Fallbacks are jinja templates too, rendered the same
way, so embedded and fallback templates behave alike (and the Gemma fallback is the text part
of Gemma 3's official template).

The returned prompt never starts with the BOS text when the model's tokenizer adds BOS itself
(``tokenizer.ggml.add_bos_token``), as llama.cpp's chat code does: the engine tokenizes with
``add_bos=True`` and ``parse_special=True`` and gets exactly one BOS token.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from infernod.protocol.errors import InfernoError

if TYPE_CHECKING:
    from infernod.backends.gguf_meta import ModelInfo

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif -%}
"""

CHATML_TEMPLATE = """{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' }}
{%- endif -%}
"""

FALLBACK_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}
# Special-token texts for fallbacks when the GGUF does not name them.
_FALLBACK_BOS = {"gemma": "<bos>", "llama3": "<|begin_of_text|>", "chatml": ""}
ARCH_FALLBACK: dict[str, str] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama3",
    "qwen2": "chatml",
}


def fallback_for(architecture: str | None) -> str:
    """Name of the fallback template for an architecture (chatml when unknown)."""
    return ARCH_FALLBACK.get(architecture or "", "chatml")


def template_name_for(info: ModelInfo) -> str:
    """What ``models.show`` reports: "gguf" for the embedded template, else the fallback."""
    return "gguf" if info.chat_template else fallback_for(info.architecture)


class _TemplateRaised(Exception):
    """A template called raise_exception(): the messages are wrong, not the template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: Any = None, sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile(text: str) -> jinja2.Template:
    """Compiled templates are cached by text: a model's template compiles once."""
    return _environment().from_string(text)


def _normalize(messages: Any) -> list[dict[str, Any]]:
    """Checks the message list; list-of-parts content is joined to its text parts."""
    if not isinstance(messages, list) or not messages:
        raise InfernoError("bad_request", "messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InfernoError("bad_request", f"messages[{i}] needs a string 'role'")
        content = m.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(t, str) for t in parts) or len(parts) != len(content):
                raise InfernoError("bad_request", f"messages[{i}].content: only text parts")
            content = "".join(parts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise InfernoError("bad_request", f"messages[{i}] needs a string 'content'")
        out.append({**m, "content": content})
    return out


def compile_error(text: str) -> str | None:
    """Why the jinja template ``text`` does not compile, or None when it does."""
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno}: {e.message}"
    return None


def render_chat(
    info_or_template: ModelInfo | str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    *,
    override: str = "",
) -> tuple[str, str]:
    """Renders a conversation to a prompt. Returns ``(prompt, template_name)``.

    ``info_or_template`` is a ModelInfo (its GGUF template, else the architecture's
    fallback), a jinja template text ("custom"), or None (chatml). ``override`` (a model's
    ``chat_template`` setting) replaces a ModelInfo's template by a fallback's name or a
    jinja text ("custom"); the model's BOS/EOS texts still apply.
    """
    msgs = _normalize(messages)
    bos = eos = ""
    strip_bos = False
    if isinstance(info_or_template, str):
        name, text = "custom", info_or_template
    elif info_or_template is None:
        name, text = "chatml", CHATML_TEMPLATE
    else:
        info = info_or_template
        name = template_name_for(info)
        text = info.chat_template or FALLBACK_TEMPLATES[name]
        if override:
            name = override if override in FALLBACK_TEMPLATES else "custom"
            text = FALLBACK_TEMPLATES.get(override, override)
        bos = info.bos_token or ("" if info.chat_template and not override
                                 else _FALLBACK_BOS.get(name, ""))
        eos = info.eos_token or ""
        strip_bos = info.add_bos_token
    source = "model's embedded" if name == "gguf" else name
    try:
        template = _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise InfernoError(
            "bad_request",
            f"the {source} chat template does not compile: line {e.lineno}: {e.message}",
            "use plain completion (no messages), or a model whose template works",
        ) from e
    try:
        prompt = template.render(
            messages=msgs, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos,
        )  # fmt: skip
    except _TemplateRaised as e:
        raise InfernoError("bad_request", f"the {source} chat template rejected the "
                           f"messages: {e}", "fix the message list") from e  # fmt: skip
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        raise InfernoError(
            "bad_request",
            f"the {source} chat template failed: {type(e).__name__}: {e}",
            "use plain completion (no messages), or a model whose template works",
        ) from e
    if strip_bos and bos and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return prompt, name
