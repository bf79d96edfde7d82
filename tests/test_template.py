"""The chat template: records render to tokens with exactly the right training labels, and back."""

import pytest

from omnigpt.errors import OmnigptError
from omnigpt.template import format_chat, parse_chat, render, render_conversation
from omnigpt.tokenizer import ASSISTANT, END_OF_TURN, EOT, IGNORE_INDEX, USER
from tests.conftest import CONVERSATION


def test_prompt_completion_targets_are_exactly_the_completion_and_eot(tok):
    r = render(tok, {"prompt": "abc=", "completion": "cba"})
    assert r.ids == tok.encode("abc=") + tok.encode("cba") + [tok.token_id(EOT)]
    targets = [t for t in r.labels if t != IGNORE_INDEX]
    assert targets == tok.encode("cba") + [tok.token_id(EOT)]
    assert r.labels[:4] == [IGNORE_INDEX] * 4


def test_chat_targets_are_exactly_the_assistant_turns(tok):
    r = render(tok, {"messages": CONVERSATION})
    end = tok.token_id(END_OF_TURN)
    expected = tok.encode("4") + [end] + tok.encode("6, of course.") + [end]
    assert [t for t in r.labels if t != IGNORE_INDEX] == expected
    # every target sits at its own position: labels equal ids wherever they are set
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(r.labels, r.ids, strict=True))
    # the user's literal "<|end|>" is text, not the control token
    assert r.ids.count(end) == len(CONVERSATION)


def test_chat_template_round_trips(tok):
    ids = render(tok, {"messages": CONVERSATION}).ids
    text = tok.decode(ids)
    assert text == format_chat(CONVERSATION)
    assert parse_chat(tok, ids) == CONVERSATION
    prompt = render_conversation(tok, CONVERSATION[:2])
    assert tok.decode(prompt) == format_chat(CONVERSATION[:2]) + ASSISTANT
    assert parse_chat(tok, prompt[:-1]) == CONVERSATION[:2]
    with pytest.raises(OmnigptError, match="no end"):
        parse_chat(tok, [tok.token_id(USER)] + tok.encode("unterminated"))


def test_placeholders_expand_to_each_media_token_count():
    from omnigpt.template import render, with_placeholders
    from omnigpt.tokenizer import AUDIO as AUDIO_TOKEN
    from omnigpt.tokenizer import IGNORE_INDEX, IMAGE, Tokenizer

    tok = Tokenizer.train_char(["what is here? a red circle, 4 1 7"])
    image_id, audio_id = tok.token_id(IMAGE), tok.token_id(AUDIO_TOKEN)
    record = {"prompt": f"what is here? {IMAGE} and {IMAGE}", "completion": "a red circle"}
    r = render(tok, record, {IMAGE: [4, 4]})
    assert r.ids.count(image_id) == 8 and r.ids.index(image_id) == len("what is here? ")
    assert all(lab == IGNORE_INDEX for i, lab in zip(r.ids, r.labels, strict=True) if i == image_id)
    # without media, a typed placeholder is just text
    assert image_id not in render(tok, record).ids
    with pytest.raises(OmnigptError, match="more <\\|image\\|> placeholders than media"):
        render(tok, record, {IMAGE: [4]})
    with pytest.raises(OmnigptError, match="1 <\\|image\\|> placeholders for 2 media"):
        render(tok, {"prompt": IMAGE, "completion": "x"}, {IMAGE: [4, 4]})

    plain = {
        "messages": [
            {"role": "user", "content": "what?"},
            {"role": "assistant", "content": "4 1 7"},
        ]
    }
    added = with_placeholders(plain, {AUDIO_TOKEN: 1})
    assert (
        added["messages"][0]["content"] == AUDIO_TOKEN + "what?"
        and plain["messages"][0]["content"] == "what?"
    )
    assert render(tok, added, {AUDIO_TOKEN: [5]}).ids.count(audio_id) == 5
    assert with_placeholders(record, {IMAGE: 2}) is record
    with pytest.raises(OmnigptError, match="2 <\\|image\\|> placeholder\\(s\\) in the text for 3"):
        with_placeholders(record, {IMAGE: 3})
