"""A chat session: one conversation with a model, driven by any front end (the terminal today).

    session = ChatSession(model, tokenizer, GenerationOptions(temperature=0.7), system="Be brief.")
    dropped = session.add_user(parse_message("/image cat.png What is this?"))
    reply = session.reply(on_text=print)          # streamed piece by piece, then returned whole
    session.reset()                               # a new conversation, same system prompt

The session keeps the history, reads the images and audio a message names, keeps the conversation
within the model's context (the oldest turns go first; the system prompt and the last message
stay), and decodes on the KV cache until `<|end|>`. A front end only reads input and shows output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omnigpt.errors import OmnigptError
from omnigpt.examples import collate_media, encode_prompt, media_loader
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.template import Message, render_conversation, stop_ids
from omnigpt.tokenizer import AUDIO, IMAGE, Tokenizer

MEDIA_COMMANDS = {"/image": ("image", IMAGE), "/audio": ("audio", AUDIO)}


def parse_message(text: str) -> Message:
    """A user's line as a message: plain text, or `/image PATH [text]` / `/audio PATH [text]`, which
    put a file (its placeholder first) into the message."""
    command, _, rest = text.strip().partition(" ")
    if command not in MEDIA_COMMANDS:
        return {"role": "user", "content": text.strip()}
    path, _, words = rest.strip().partition(" ")
    if not path:
        raise OmnigptError(f"{command} needs a file path")
    kind, placeholder = MEDIA_COMMANDS[command]
    return {"role": "user", "content": placeholder + words.strip(), kind: path}


def fit_history(
    tokenizer: Tokenizer, system: list[Message], history: list[Message], budget: int
) -> tuple[list[Message], int]:
    """Drops the oldest messages of `history` (never the system prompt, never the last message)
    until the rendered conversation fits in `budget` tokens; returns it and how many were dropped."""
    dropped = 0
    while len(history) > 1 and len(render_conversation(tokenizer, system + history)) > budget:
        history = history[1:]
        dropped += 1
    while history and history[0]["role"] == "assistant" and len(history) > 1:
        history, dropped = history[1:], dropped + 1  # a conversation starts with the user
    return history, dropped


class ChatSession:
    """A conversation: `add_user` a message, then `reply`. Paths in messages are relative to
    `base_dir`."""

    def __init__(
        self,
        model: GPT | MultimodalGPT,
        tokenizer: Tokenizer,
        opts: GenerationOptions,
        system: str | None = None,
        base_dir: str | Path = ".",
    ):
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.history: list[Message] = []
        self.loader = media_loader(model, base_dir)
        self.stops = stop_ids(tokenizer)
        block = model.config.block_size
        # room for the longest reply, but never more than half the context
        self.budget = block - min(opts.max_new_tokens, block // 2)
        self._pending: tuple[list[int], dict] | None = None

    @property
    def sees_media(self) -> bool:
        return self.loader is not None

    def reset(self) -> None:
        self.history, self._pending = [], None

    def add_user(self, message: Message) -> int:
        """Adds a user message; returns how many of the oldest messages were dropped to keep the
        conversation within the context. A message whose media cannot be read, or that alone is
        too long, is refused (OmnigptError) and the conversation stays as it was."""
        history, dropped = fit_history(
            self.tokenizer, self.system, [*self.history, message], self.budget
        )
        conversation = self.system + history
        record: dict = {"messages": [*conversation, {"role": "assistant", "content": ""}]}
        for kind in ("image", "audio"):
            record[kind] = [m[kind] for m in conversation if kind in m]
        prompt, media = encode_prompt(self.tokenizer, record, self.loader)
        if len(prompt) >= self.model.config.block_size:
            raise OmnigptError(
                "that message is too long for the model's context of "
                f"{self.model.config.block_size} tokens"
            )
        self.history, self._pending = history, (prompt, media)
        return dropped

    def reply(self, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to the conversation so far, added to the history; `on_text` gets it
        piece by piece as it is generated (whole UTF-8 characters only)."""
        if self._pending is None:
            raise OmnigptError("nothing to reply to: add a user message first")
        (prompt, media), self._pending = self._pending, None
        stream = self.tokenizer.stream()

        def on_step(ids: list[int]) -> None:
            if on_text is not None and ids[0] not in self.stops:
                on_text(stream.push(ids[0]))

        device = self.model.wte.weight.device
        inputs = {k: v.to(device) for k, v in collate_media([media]).items()} if media else {}
        [new] = generate_tokens(
            self.model,
            [prompt],
            self.opts,
            self.stops,
            self.tokenizer.vocab_size,
            on_step,
            prefill_inputs=inputs,
        )
        if on_text is not None:
            on_text(stream.flush())
        text = self.tokenizer.decode(new).strip()
        self.history.append({"role": "assistant", "content": text})
        return text
