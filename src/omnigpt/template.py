"""The chat template: how a record renders to tokens with training labels, and back to messages.

Three record kinds (read from JSONL in `examples.py`):

    {"prompt": "Translate: a dog", "completion": "ein Hund"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "a red circle", "image_out": "circle.png"}          (text → image)

A prompt/completion record renders as `prompt completion <|endoftext|>`; a text→image record as
`prompt <|image_start|> codes <|image_end|> <|endoftext|>` (see `pixels.py`), where only the codes
and `<|image_end|>` are targets (with an empty prompt, it teaches the model to draw unconditionally).
A conversation renders each turn as a role token, its content and `<|end|>`:

    <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

Training targets (`labels`) are the completion and `<|endoftext|>`, or each assistant turn's content and
its `<|end|>`; everything else is IGNORE_INDEX. Text inside content is encoded as text: a literal
"<|end|>" typed by a user stays characters, it never becomes the control token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from omnigpt.errors import OmnigptError
from omnigpt.tokenizer import (
    ASSISTANT,
    AUDIO,
    END_OF_TURN,
    EOT,
    IGNORE_INDEX,
    IMAGE,
    IMAGE_START,
    SYSTEM,
    USER,
    Tokenizer,
)

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE)}|{re.escape(AUDIO)})")
Message = dict[str, str]


# -- rendering ------------------------------------------------------------------------------------


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]  # ids where the token is a training target, IGNORE_INDEX elsewhere


def _special(tokenizer: Tokenizer, token: str) -> int:
    i = tokenizer.token_id(token)
    if i is None:
        raise OmnigptError(
            f"the tokenizer has no {token} token; fine-tuning needs a tokenizer trained by omnigpt "
            "or one with the chat tokens added"
        )
    return i


MediaCounts = dict[
    str, list[int]
]  # placeholder ("<|image|>") → tokens of each of its media, in order


def _encode(
    tokenizer: Tokenizer, text: str, media: MediaCounts | None, used: dict[str, int]
) -> list[int]:
    """Text as tokens. With `media`, each `<|image|>` / `<|audio|>` becomes as many placeholder ids
    as its image or clip has tokens; without, they stay plain text like any other characters."""
    if not media:
        return tokenizer.encode(text, allow_special=False)
    ids: list[int] = []
    for piece in _PLACEHOLDER.split(text):
        if piece in media:
            i = used.get(piece, 0)
            if i >= len(media[piece]):
                raise OmnigptError(f"more {piece} placeholders than media ({len(media[piece])})")
            ids += [_special(tokenizer, piece)] * media[piece][i]
            used[piece] = i + 1
        elif piece:
            ids += tokenizer.encode(piece, allow_special=False)
    return ids


def _check_all_used(media: MediaCounts | None, used: dict[str, int]) -> None:
    for token, counts in (media or {}).items():
        if used.get(token, 0) != len(counts):
            raise OmnigptError(f"{used.get(token, 0)} {token} placeholders for {len(counts)} media")


def render(tokenizer: Tokenizer, record: dict, media: MediaCounts | None = None) -> Rendered:
    """Tokens and training labels of a checked record (see the module docstring for the layout).

    `media` gives, per placeholder kind, the token count of each of the record's images or clips;
    the record's placeholders are expanded to those counts (see `with_placeholders`)."""
    used: dict[str, int] = {}
    if "image_out" in record:
        prompt = _encode(tokenizer, record["prompt"], media, used)
        _check_all_used(media, used)
        image = tokenizer.encode_image(record["image_out"])
        ids = prompt + image + [_special(tokenizer, EOT)]
        return Rendered(ids, [IGNORE_INDEX] * (len(prompt) + 1) + image[1:] + [IGNORE_INDEX])
    if "messages" not in record:
        prompt = _encode(tokenizer, record["prompt"], media, used)
        completion = _encode(tokenizer, record["completion"], media, used)
        _check_all_used(media, used)
        completion.append(_special(tokenizer, EOT))
        return Rendered(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
    ids: list[int] = []
    labels: list[int] = []
    end = _special(tokenizer, END_OF_TURN)
    for m in record["messages"]:
        head = [_special(tokenizer, ROLES[m["role"]])]
        body = _encode(tokenizer, m["content"], media, used) + [end]
        ids += head + body
        labels += [IGNORE_INDEX] * len(head)
        labels += body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
    _check_all_used(media, used)
    return Rendered(ids, labels)


def with_placeholders(record: dict, counts: dict[str, int]) -> dict:
    """The record with `counts[placeholder]` placeholders of each kind: as written when the text has
    exactly that many, else added at the start of the prompt (or first user message) when it has
    none. Raises on any other number."""
    texts = (
        [record["prompt"]]
        if "messages" not in record
        else [m["content"] for m in record["messages"]]
    )
    missing = ""
    for token, n in counts.items():
        written = sum(t.count(token) for t in texts)
        if written == 0:
            missing += token * n
        elif written != n:
            raise OmnigptError(
                f"{written} {token} placeholder(s) in the text for {n} media file(s)"
            )
    if not missing:
        return record
    if "messages" not in record:
        return {**record, "prompt": missing + record["prompt"]}
    messages = [dict(m) for m in record["messages"]]
    first_user = next((m for m in messages if m["role"] == "user"), messages[0])
    first_user["content"] = missing + first_user["content"]
    return {**record, "messages": messages}


def prompt_ids(tokenizer: Tokenizer, record: dict, media: MediaCounts | None = None) -> list[int]:
    """What a model is given to produce the record's answer: the prompt, or the conversation up to
    its last assistant turn followed by `<|assistant|>`; with `media`, its placeholders expanded
    (the media belong in that part)."""
    if "messages" not in record:
        used: dict[str, int] = {}
        ids = _encode(tokenizer, record["prompt"], media, used)
        _check_all_used(media, used)
        return ids + ([_special(tokenizer, IMAGE_START)] if "image_out" in record else [])
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    head = render(tokenizer, {"messages": messages[:last]}, media).ids if last else []
    return head + [_special(tokenizer, ASSISTANT)]


def reference(record: dict) -> str:
    """The answer a record expects: its completion, or its last assistant turn."""
    if "image_out" in record:
        raise OmnigptError(
            "a text→image example has no text answer to score (perplexity scores its image)"
        )
    if "messages" not in record:
        return record["completion"]
    return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]


def render_conversation(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """A conversation so far, ending with the `<|assistant|>` token that asks for the next reply."""
    ids = render(tokenizer, {"messages": messages}).ids if messages else []
    return ids + [_special(tokenizer, ASSISTANT)]


def stop_ids(tokenizer: Tokenizer, record: dict | None = None) -> list[int]:
    """Tokens that end a generated answer: `<|end|>` for conversations, `<|endoftext|>` for both."""
    ids = [tokenizer.token_id(EOT)]
    if record is None or "messages" in record:
        ids.append(tokenizer.token_id(END_OF_TURN))
    return [i for i in ids if i is not None]


# -- text form ------------------------------------------------------------------------------------


def format_chat(messages: list[Message]) -> str:
    """The text the chat template's tokens decode to."""
    return "".join(f"{ROLES[m['role']]}{m['content']}{END_OF_TURN}" for m in messages)


def parse_chat(tokenizer: Tokenizer, ids: list[int]) -> list[Message]:
    """The messages of a rendered conversation, split on the role and `<|end|>` token ids (so a
    literal "<|end|>" inside a message is no boundary); raises on ids that are not one."""
    by_id = {_special(tokenizer, token): role for role, token in ROLES.items()}
    end = _special(tokenizer, END_OF_TURN)
    messages, i = [], 0
    while i < len(ids):
        if ids[i] not in by_id:
            raise OmnigptError(f"not a rendered conversation: token {i} is no role token")
        try:
            j = ids.index(end, i + 1)
        except ValueError:
            raise OmnigptError(
                f"not a rendered conversation: turn at token {i} has no end"
            ) from None
        messages.append({"role": by_id[ids[i]], "content": tokenizer.decode(ids[i + 1 : j])})
        i = j + 1
    return messages
