"""Token-in-token-out chats: one growing chat per seat, held as the exact token ids the engine saw.

A seat's chat is re-sent to the engine at every decision (prefix caching makes that cheap), so it
must be held as token ids, never as text that is re-tokenised: a model's generated ids need not
be what the tokenizer makes of their text (``<A>`` may be generated as ``<``, ``A``, ``>``), and
training must see exactly what was sampled. So:

- user turns are rendered with the model's chat template *incrementally*: render the message list
  as text (with the generation prompt), take the text beyond what was rendered before, tokenise
  only that suffix;
- assistant turns are the generated ids as generated, followed by the template's end-of-turn text
  (``<|im_end|>\\n`` in ChatML) as prompt ids; when the engine already generated the end-of-turn
  token (the stop token), only the rest of it is appended.

This is only right if the template renders a chat as the concatenation of its turns. The
:func:`check_template` guard proves that, for the served tokenizer, on a sample conversation
(incremental ids == ``apply_chat_template`` of the whole chat) and the engine refuses to run
otherwise. Templates that inject a default system prompt (SmolLM2's) pass: the system prompt is
part of the first rendered turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class TemplateError(RuntimeError):
    """The chat template cannot be rendered incrementally: refuse to run rather than train on
    token ids that differ from what a whole-chat render would give."""


def _ids(out: Any) -> list[int]:
    """apply_chat_template's token ids, whatever shape this transformers version returns."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


class ChatTemplate:
    """A tokenizer's chat template, rendered to text and tokenised in pieces.

    `system`: an explicit system prompt (None: whatever the template does without one).
    `eot_ids`: token ids the engine may generate to end a turn (default: the tokenizer's EOS).
    """

    def __init__(self, tokenizer: Any, system: str | None = None, eot_ids: Sequence[int] | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise TemplateError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.system = system
        eos = tokenizer.eos_token_id
        self.eot_ids = set(eot_ids) if eot_ids is not None else ({int(eos)} if eos is not None else set())

    @classmethod
    def from_pretrained(cls, path: str, system: str | None = None) -> ChatTemplate:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), system=system)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)

    def render_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """The whole-chat token ids, as transformers renders them (the guard's reference)."""
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        return _ids(out)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def new_chat(self) -> Chat:
        return Chat(self)


@dataclass
class Chat:
    """One seat's conversation: `ids` is exactly what the engine sees next (after add_user)."""

    template: ChatTemplate

    def __post_init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.template.system is not None:
            self.messages.append({"role": "system", "content": self.template.system})
        self.ids: list[int] = []
        self._text = ""  # the template text that `ids` stands for

    def _delta(self, text: str) -> str:
        if not text.startswith(self._text):
            raise TemplateError(
                "the chat template re-renders earlier turns differently once a turn is added; "
                "incremental token-in-token-out chats are impossible with it"
            )
        return text[len(self._text) :]

    def add_user(self, content: str) -> list[int]:
        """Append a user turn and the assistant generation prompt; return the new (prompt) ids."""
        self.messages.append({"role": "user", "content": content})
        text = self.template.render(self.messages, add_generation_prompt=True)
        new = self.template.encode(self._delta(text))
        self.ids.extend(new)
        self._text = text
        return new

    def add_assistant(self, generated: Sequence[int], text: str | None = None) -> list[int]:
        """Append the generated ids as generated, then the template's end-of-turn as prompt ids;
        return those end-of-turn ids. `text` is the turn's content for rendering (default: the
        decoded ids without a trailing stop token); it is never re-tokenised."""
        generated = [int(i) for i in generated]
        body = generated[:-1] if generated and generated[-1] in self.template.eot_ids else generated
        content = self.template.decode(body) if text is None else text
        self.ids.extend(generated)
        self.messages.append({"role": "assistant", "content": content})
        full = self.template.render(self.messages, add_generation_prompt=False)
        delta = self._delta(full)
        if not delta.startswith(content):
            raise TemplateError("the chat template does not render an assistant turn's content verbatim")
        closing = self.template.encode(delta[len(content) :])
        # The engine may have generated the start of the closing already (its stop token).
        k = min(len(closing), len(generated))
        while k > 0 and generated[len(generated) - k :] != closing[:k]:
            k -= 1
        closing = closing[k:]
        self.ids.extend(closing)
        self._text = full
        return closing


SAMPLE_TURNS: tuple[tuple[str, str], ...] = (
    ("You are playing a game. Answer with exactly <A> or <B>.", "<A>"),
    ("Last round, the other agent played <B>.", "<B>"),
    ("Round three:\n- a list\n- with  two  spaces\n\nAnswer now.", "I will play <A> again, then see."),
    ("Last round, the other agent played <A>. Écrivez: «ok» 😀", "<<message_start>> ok <<message_end>>"),
)


def check_template(template: ChatTemplate, turns: Sequence[tuple[str, str]] = SAMPLE_TURNS) -> None:
    """Refuse (TemplateError) unless incremental rendering equals whole-chat rendering.

    For each prefix of a sample conversation (several user/assistant turns) the incremental ids
    must equal ``apply_chat_template`` of the whole message list: after each user turn (with the
    generation prompt) and after the whole chat. Assistant turns are the tokenised content plus
    a stop token, as an engine would generate them.
    """
    chat = template.new_chat()
    stop = sorted(template.eot_ids)[:1]
    for i, (user, assistant) in enumerate(turns):
        chat.add_user(user)
        want = template.render_ids(chat.messages, add_generation_prompt=True)
        if chat.ids != want:
            raise TemplateError(_mismatch(template, f"after user turn {i}", chat.ids, want))
        chat.add_assistant(template.encode(assistant) + stop, text=assistant)
    want = template.render_ids(chat.messages, add_generation_prompt=False)
    if chat.ids != want:
        raise TemplateError(_mismatch(template, "after the whole chat", chat.ids, want))


def _mismatch(template: ChatTemplate, where: str, got: list[int], want: list[int]) -> str:
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return (
        f"chat template guard failed {where}: incremental rendering differs from rendering the whole "
        f"chat at token {i} (incremental {template.decode(got[i : i + 8])!r} vs whole "
        f"{template.decode(want[i : i + 8])!r}); refusing to run with this template"
    )
