"""Token-in-token-out chats: the template guard and incremental rendering (SmolLM2's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.chat import ChatTemplate, TemplateError, check_template


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_pretrained(str(model_dir))


def _broken(template: ChatTemplate, old: str, new: str) -> ChatTemplate:
    from copy import deepcopy

    tok = deepcopy(template.tokenizer)
    assert old in tok.chat_template
    tok.chat_template = tok.chat_template.replace(old, new)
    return ChatTemplate(tok)


def test_guard_passes_on_smollm2_with_its_default_system_prompt(template: ChatTemplate) -> None:
    check_template(template)
    chat = template.new_chat()
    chat.add_user("hi")
    assert "You are a helpful AI assistant named SmolLM" in template.decode(chat.ids)
    check_template(ChatTemplate(template.tokenizer, system="You play games."))


def test_guard_refuses_a_template_that_rerenders_history(template: ChatTemplate) -> None:
    # the default system prompt counts the messages: earlier text changes as the chat grows
    count = "' + (messages | length | string) + '"
    broken = _broken(template, "trained by Hugging Face", f"trained by Hugging Face {count}")
    with pytest.raises(TemplateError, match="re-renders earlier turns"):
        check_template(broken)


def test_guard_refuses_a_generation_prompt_that_differs_from_the_turn(template: ChatTemplate) -> None:
    # the generation prompt opens the assistant turn differently from how a finished turn renders
    broken = _broken(template, "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'")
    with pytest.raises(TemplateError):
        check_template(broken)


def test_incremental_ids_equal_the_full_render_and_generated_ids_are_kept(template: ChatTemplate) -> None:
    chat = template.new_chat()
    eos = template.tokenizer.eos_token_id
    turns = [("Answer <A> or <B>.", "<B>"), ("Last round, the other agent played <B>.", "<A>"), ("Again.", "<B>")]
    for user, answer in turns:
        new = chat.add_user(user)
        assert chat.ids == template.render_ids(chat.messages, add_generation_prompt=True)
        assert new == chat.ids[len(chat.ids) - len(new) :]
        chat.add_assistant(template.encode(answer) + [eos])
    assert chat.ids == template.render_ids(chat.messages, add_generation_prompt=False)

    # a generation split into unusual tokens ("H", "e", "l", "l", "o") is kept as generated
    odd = [template.encode(c)[0] for c in "Hello"]
    assert odd != template.encode("Hello")
    chat.add_user("Once more.")
    before = len(chat.ids)
    closing = chat.add_assistant(odd)  # stopped without the stop token: the closing adds it
    assert chat.ids[before : before + 5] == odd
    assert template.decode(closing) == "<|im_end|>\n"
    assert chat.messages[-1] == {"role": "assistant", "content": "Hello"}
