"""An instruction-tuned model's own chat template, rendered by transformers.

``urial-edge shift --aligned-model M`` asks a tuned model for its answers the way
it was trained to be asked: the Jinja template in its ``tokenizer_config.json``
(``chat_template``; imported GGUF files keep theirs, see model/gguf_import.py) or
a ``chat_template.jinja`` file, rendered by transformers' own renderer (its
sandbox, filters and message handling) for one user message with the generation
prompt. The rendered text carries its own special tokens (BOS included), so it is
tokenized without adding any.
"""

import json
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
        self.source, self.bos_token, self.eos_token, self.name = source, bos_token, eos_token, name

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
        """The template applied to ``messages`` (transformers compiles it once and keeps it)."""
        import jinja2
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.source,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise UrialError(f"the chat template of {self.name} does not compile: {one_line(e)}") from None
        except jinja2.exceptions.TemplateError as e:
            raise UrialError(f"the chat template of {self.name} failed: {one_line(e)}") from None
        return rendered[0]

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
