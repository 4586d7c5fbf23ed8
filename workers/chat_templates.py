"""Named chat templates for checkpoints without one (Jinja files in workers/templates/), with the
stop strings each needs: a model trained on a template ends its reply with that template's
end-of-turn text, or starts the next turn's header, and without these stops it never stops
(FastChat's most reported template bug).

`--chat-template` takes a name from TEMPLATES, a Jinja file, or template text; unset, the
tokenizer's own template is used and its EOS ends generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    # Text that ends a reply: the template's end-of-turn marker and the next turn's header.
    stop: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return (FOLDER / f"{self.name}.jinja").read_text()


TEMPLATES = {
    t.name: t
    for t in [
        ChatTemplate("vicuna", stop=("</s>", "USER:")),
        ChatTemplate("llama-2-chat", stop=("</s>", "[INST]")),
        ChatTemplate("llama-3", stop=("<|eot_id|>", "<|start_header_id|>")),
        ChatTemplate("alpaca", stop=("</s>", "### Instruction:")),
        ChatTemplate("chatml", stop=("<|im_end|>", "<|im_start|>")),
        # ChatML with tools, in the Hermes/Qwen format (workers/tools.py).
        ChatTemplate("hermes", stop=("<|im_end|>", "<|im_start|>")),
        ChatTemplate("zephyr", stop=("</s>", "<|user|>")),
        ChatTemplate("mistral-instruct", stop=("</s>", "[INST]")),
        ChatTemplate("one-shot", stop=("### Human:", "###")),
    ]
}


@dataclass(frozen=True)
class Stops:
    """What ends every reply on top of each request's own stops."""

    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()


NO_STOPS = Stops()


def apply(tokenizer, choice: str | None) -> Stops:
    """Sets the tokenizer's chat template from `choice` (a name, a Jinja file or template text)
    and returns the stops it brings. A stop string that is one token of the vocabulary (a special
    token such as <|im_end|>) also stops by its id, before any text is decoded."""
    if not choice:
        return NO_STOPS
    if choice in TEMPLATES:
        template = TEMPLATES[choice]
        tokenizer.chat_template = template.text
        strings = template.stop
    else:
        path = Path(choice).expanduser()
        tokenizer.chat_template = path.read_text() if path.is_file() else choice
        return NO_STOPS
    vocabulary = tokenizer.get_vocab()
    ids = tuple(vocabulary[s] for s in strings if s in vocabulary)
    return Stops(strings, ids)
