"""The chat session: history within the context, media in messages, replies streamed."""

import pytest
import torch

from omnigpt.chat import parse_message
from omnigpt.errors import OmnigptError
from tests.conftest import CORPUS, tiny_model


def test_chat_history_drops_oldest_turns_to_fit():
    from omnigpt.chat import fit_history
    from omnigpt.template import render_conversation
    from omnigpt.tokenizer import Tokenizer

    tok = Tokenizer.train_char([CORPUS])
    system = [{"role": "system", "content": "be brief"}]
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    history.append({"role": "user", "content": "last"})
    kept, dropped = fit_history(tok, system, history, budget=60)
    assert dropped > 0 and kept[-1]["content"] == "last" and kept[0]["role"] == "user"
    assert len(render_conversation(tok, system + kept)) <= 60
    assert kept == history[dropped:]


@pytest.fixture
def session_parts(tok):
    from omnigpt.generate import GenerationOptions

    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, block_size=128)
    return model, tok, GenerationOptions(temperature=0.0, max_new_tokens=8, token_healing=False)


def test_a_session_streams_each_reply_and_keeps_the_conversation(session_parts):
    from omnigpt.chat import ChatSession
    from omnigpt.generate import generate_tokens
    from omnigpt.template import render_conversation, stop_ids

    model, tok, opts = session_parts
    session = ChatSession(model, tok, opts, system="be brief")
    pieces: list[str] = []
    assert session.add_user(parse_message("abc?")) == 0
    first = session.reply(on_text=pieces.append)
    assert "".join(pieces).strip() == first
    session.add_user(parse_message("and def?"))
    second = session.reply()
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert [session.history[1]["content"], session.history[3]["content"]] == [first, second]
    # the second reply continues the whole conversation, as decoding it directly does
    conversation = session.system + session.history[:3]
    [expected] = generate_tokens(
        model, [render_conversation(tok, conversation)], opts, stop_ids(tok), tok.vocab_size
    )
    assert second == tok.decode(expected).strip()
    session.reset()
    assert session.history == [] and session.system[0]["content"] == "be brief"


def test_a_refused_message_leaves_the_conversation_as_it_was(session_parts, tmp_path):
    from omnigpt.chat import ChatSession

    model, tok, opts = session_parts
    session = ChatSession(model, tok, opts)
    session.add_user(parse_message("abc"))
    session.reply()
    before = list(session.history)
    with pytest.raises(OmnigptError, match="reads text only"):
        session.add_user(parse_message(f"/image {tmp_path / 'x.png'} what is it?"))
    with pytest.raises(OmnigptError, match="too long for the model's context"):
        session.add_user(parse_message("a" * 300))
    assert session.history == before
    with pytest.raises(OmnigptError, match="nothing to reply to"):
        session.reply()


def test_media_commands_put_a_file_into_the_message():
    from omnigpt.tokenizer import AUDIO, IMAGE

    assert parse_message(" hello ") == {"role": "user", "content": "hello"}
    assert parse_message("/image cat.png what is it?") == {
        "role": "user",
        "content": IMAGE + "what is it?",
        "image": "cat.png",
    }
    assert parse_message("/audio a.wav") == {"role": "user", "content": AUDIO, "audio": "a.wav"}
    with pytest.raises(OmnigptError, match="/image needs a file path"):
        parse_message("/image")
