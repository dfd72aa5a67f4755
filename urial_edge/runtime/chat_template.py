"""An instruction-tuned model's own chat template, rendered the way transformers renders it.

``urial-edge shift --aligned-model M`` asks a tuned model for its answers the way
it was trained to be asked: the Jinja template in its ``tokenizer_config.json``
(``chat_template``; imported GGUF files keep theirs, see model/gguf_import.py) or
a ``chat_template.jinja`` file, rendered with jinja2 in a sandbox with
transformers' settings (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``,
``tojson``), for one user message with the generation prompt. The rendered text
carries its own special tokens (BOS included), so it is tokenized without adding any.
"""

import json
import time
from pathlib import Path
from typing import List, Optional

from ..errors import UrialError, one_line

MARK = "\u2063urial-edge-answer\u2063"  # an assistant message no real answer contains


def _token_text(value) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def template_source(model_path: Path) -> Optional[str]:
    """The model's chat template text, or None if it has none."""
    config = _read_json(Path(model_path) / "tokenizer_config.json")
    found = config.get("chat_template")
    if isinstance(found, list):  # named templates: transformers uses "default"
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(found, str) and found.strip():
        return found
    try:
        return (Path(model_path) / "chat_template.jinja").read_text(encoding="utf-8")
    except OSError:
        return None


class ChatTemplate:
    """Renders one user turn and knows the text that ends an assistant turn."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "the model"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.name, self.bos_token, self.eos_token = name, bos_token, eos_token
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise UrialError(f"the chat template of {name} does not compile: {one_line(e)}") from None

    @classmethod
    def of_model(cls, model_path: Path, name: Optional[str] = None) -> "ChatTemplate":
        """The template of a model directory; a one-line error if it has none."""
        label = name or Path(model_path).name
        source = template_source(model_path)
        if source is None:
            raise UrialError(f"{label} has no chat template (no chat_template in tokenizer_config.json); "
                             "--aligned-model needs an instruction-tuned model that has one")
        config = _read_json(Path(model_path) / "tokenizer_config.json")
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), label)

    def render(self, messages: List[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise UrialError(f"the chat template of {self.name} failed: {one_line(e)}") from None

    def prompt(self, query: str) -> str:
        """The text before the model's answer to ``query``: the user turn and the assistant's opening."""
        return self.render([{"role": "user", "content": query}], add_generation_prompt=True)

    def end_of_turn(self) -> str:
        """What the template writes right after an assistant message (e.g. ``<|im_end|>``), up to a line end."""
        text = self.render([{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}], False)
        if MARK not in text:
            return ""
        after = text[text.index(MARK) + len(MARK):]
        return after.strip().split("\n")[0].strip() if after.strip() else ""
