"""Chat templates: the checkpoint's Jinja2 template rendered in a sandbox, as HF does.

The template comes from tokenizer_config.json's `chat_template` (a string, or a list of
{"name", "template"} from which "default" is used) or a `chat_template.jinja` file next
to it; `HFTokenizer` reads it. Rendering uses jinja2's ImmutableSandboxedEnvironment
(templates are checkpoint data, not code: no attribute access to Python internals, no
mutation of the messages) with HF's extras: `raise_exception`, the `tojson` filter,
`strftime_now`, and the loopcontrols extension. The rendered text already holds the
special tokens (BOS, role markers), so it is encoded without adding BOS again.
"""

from __future__ import annotations

import datetime
import json

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
  """The template failed to render these messages (a 400 for the requester)."""


def _raise_exception(message):
  raise ChatTemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


class ChatTemplate:
  """A compiled chat template and the special tokens it is rendered with."""

  def __init__(self, source: str, tokenizer, *, bos_token: str | None = None,
               eos_token: str | None = None):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self.template = env.from_string(source)
    except jinja2.TemplateError as e:
      raise ValueError(f"chat_template does not compile: {e}") from e
    self.tokenizer = tokenizer
    self.bos_token, self.eos_token = bos_token or "", eos_token or ""

  @classmethod
  def from_tokenizer(cls, tokenizer) -> "ChatTemplate | None":
    source = getattr(tokenizer, "chat_template", None)
    if not source:
      return None
    return cls(source, tokenizer, bos_token=getattr(tokenizer, "bos_token", None),
               eos_token=getattr(tokenizer, "eos_token", None))

  def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    try:
      return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=self.bos_token, eos_token=self.eos_token)
    except ChatTemplateError:
      raise
    except jinja2.TemplateError as e:  # includes SecurityError from the sandbox
      raise ChatTemplateError(f"messages: the chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
      raise ChatTemplateError(f"messages: the chat template failed: {e}") from e

  def render_ids(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    text = self.render(messages, add_generation_prompt=add_generation_prompt)
    ids = self.tokenizer.encode(text, add_bos=False)
    if not ids:
      raise ChatTemplateError("messages: the chat template rendered an empty prompt")
    return ids
