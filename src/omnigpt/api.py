"""The OpenAI API's shapes: request bodies, what they ask of the engine, and the JSON sent back.

    body = ChatRequest.model_validate(json)              # 400 on a field it does not know
    work = chat_work(body, model, tokenizer, limits)      # an engine Request (media decoded)
    chunk = chat_chunk(meta, index, {"content": "Hi"})   # a streamed chat.completion.chunk

What is supported, refused and ignored (README, "Serving"):
- sampling: temperature, top_p, max_tokens / max_completion_tokens, stop (up to 4), n, seed,
  logprobs (+ top_logprobs), stream, stream_options.include_usage; as extensions, top_k,
  repetition_penalty and ignore_eos.
- refused with 400 when set to anything but their neutral value: presence_penalty,
  frequency_penalty, logit_bias, tools, tool_choice, response_format other than text, echo, suffix,
  best_of; any field the API does not have.
- ignored: user, metadata, store, service_tier, parallel_tool_calls, an image part's detail
  (images are read at the model's own size); they change no output.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnigpt.config import GenerationOptions
from omnigpt.engine import Request, TokenLogprob
from omnigpt.errors import OmnigptError
from omnigpt.examples import collate_media, encode_prompt, media_loader
from omnigpt.template import stop_ids
from omnigpt.tokenizer import ASSISTANT, AUDIO, IMAGE, Tokenizer

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        if self.status in (413, 429):
            kind = "invalid_request_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


# -- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The parameters chat and completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension (vLLM's): -1 or None is off
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    ignore_eos: bool = False  # extension (vLLM's): generate past the end token, to max_tokens
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # ignored: they change no output
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (use repetition_penalty)", name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options needs stream: true", "stream_options")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences", "stop")
        return tuple(s for s in stops if s)


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputAudio(_Body):
    data: str
    format: str


class ContentPart(_Body):
    type: Literal["text", "image_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None  # ignored

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tool calling is not supported", "tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "only the text response format is supported", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of is not supported (it must equal n)", "best_of")


class ImageRequest(_Body):
    prompt: str
    model: str
    n: int = Field(1, ge=1, le=16)
    size: str | None = None
    response_format: Literal["b64_json"] | None = None
    seed: int | None = None  # extension
    quality: Literal["auto"] | None = None
    user: str | None = None  # ignored


# -- from a body to the engine's work -------------------------------------------------------------


@dataclass
class Limits:
    """What a request may hold (`ServeConfig`'s share of it)."""

    max_image_pixels: int
    max_running: int


def sampling_options(body: _Sampling, prompt_len: int, block_size: int, limit: int | None):
    """GenerationOptions from a body; 400 when the prompt and the answer cannot fit the context."""
    room = block_size - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"This model's maximum context length is {block_size} tokens. However, your prompt is "
            f"{prompt_len} tokens, which leaves no room for an answer.",
            "messages" if isinstance(body, ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    if limit is not None and prompt_len + limit > block_size:
        raise ApiError(
            400,
            f"This model's maximum context length is {block_size} tokens. However, you requested "
            f"{prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} for the answer). "
            "Please reduce the prompt or the answer's length.",
            "max_tokens",
            "context_length_exceeded",
        )
    top_k = body.top_k if body.top_k not in (None, -1, 0) else None
    return GenerationOptions(
        max_new_tokens=limit or room,
        temperature=body.temperature,
        top_k=top_k,
        top_p=body.top_p if body.top_p < 1 else None,
        repetition_penalty=body.repetition_penalty,
        stop_strings=body.stops(),
        seed=body.seed,
        stop_at_eot=not body.ignore_eos,
        token_healing=False,
    )


def chat_work(body: ChatRequest, model, tokenizer: Tokenizer, limits: Limits) -> Request:
    """The engine Request of a chat body: its messages through the chat template, images and audio
    decoded (400 when one cannot be, or is too large)."""
    body.refuse_unsupported()
    if tokenizer.token_id(ASSISTANT) is None:
        raise ApiError(
            400, "this model has no chat template (its tokenizer lacks the chat tokens): use "
            "/v1/completions", "messages",
        )  # fmt: skip
    messages, images, audio = [], [], []
    for i, message in enumerate(body.messages):
        parts = message.content if isinstance(message.content, list) else None
        text = "" if message.content is None else message.content if parts is None else ""
        for j, part in enumerate(parts or []):
            where = f"messages.{i}.content.{j}"
            if part.type == "text":
                if part.text is None:
                    raise ApiError(400, "a text part needs its text", where)
                if IMAGE in part.text or AUDIO in part.text:
                    raise ApiError(400, f"text may not hold {IMAGE} or {AUDIO}", where)
                text += part.text
            elif part.type == "image_url":
                if part.image_url is None:
                    raise ApiError(400, "an image_url part needs its image_url", where)
                images.append(_image_bytes(part.image_url.url, limits.max_image_pixels, where))
                text += IMAGE
            else:
                if part.input_audio is None:
                    raise ApiError(400, "an input_audio part needs its input_audio", where)
                audio.append(_audio_bytes(part.input_audio, where))
                text += AUDIO
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    record: dict = {"messages": [*messages, {"role": "assistant", "content": ""}]}
    if images:
        record["image"] = images
    if audio:
        record["audio"] = audio
    prompt, inputs = _encode(tokenizer, record, model, "messages")
    limit = body.max_completion_tokens or body.max_tokens
    opts = sampling_options(body, len(prompt), model.config.block_size, limit)
    _check_n(body.n, limits)
    top = (body.top_logprobs or 0) if body.logprobs else None
    stops = frozenset(stop_ids(tokenizer))
    return Request(prompt, opts, stops, body.n, inputs, top)


def completion_work(body: CompletionRequest, model, tokenizer: Tokenizer, limits: Limits):
    """One engine Request per prompt of a completions body."""
    body.refuse_unsupported()
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ApiError(400, "the prompt is empty", "prompt")
    _check_n(body.n * len(prompts), limits)
    stops = frozenset(stop_ids(tokenizer, {"prompt": ""}))
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if max(ids) >= tokenizer.vocab_size or min(ids) < 0:
            raise ApiError(400, f"token ids must be from 0 to {tokenizer.vocab_size - 1}", "prompt")
        opts = sampling_options(body, len(ids), model.config.block_size, body.max_tokens)
        out.append(Request(ids, opts, stops, body.n, {}, body.logprobs))
    return out


def transcription_work(data: bytes, model, tokenizer: Tokenizer, instruction: str) -> Request:
    """The engine Request that transcribes one uploaded audio file (greedy)."""
    if getattr(model, "audio", None) is None:
        raise ApiError(400, "this model has no audio encoder: it cannot transcribe", "model")
    record = {"prompt": instruction, "audio": data}
    prompt, inputs = _encode(tokenizer, record, model, "file")
    room = model.config.block_size - len(prompt)
    opts = GenerationOptions(max_new_tokens=max(room, 1), temperature=0.0, token_healing=False)
    return Request(prompt, opts, frozenset(stop_ids(tokenizer, record)), 1, inputs)


def _check_n(n: int, limits: Limits) -> None:
    if n > limits.max_running:
        raise ApiError(
            400, f"at most {limits.max_running} answers per request on this server (n)", "n"
        )


def _encode(tokenizer, record: dict, model, param: str) -> tuple[list[int], dict]:
    """A record's prompt ids and its media as model inputs (400 on media the model cannot take)."""
    try:
        prompt, media = encode_prompt(tokenizer, record, media_loader(model))
    except OmnigptError as e:
        raise ApiError(400, str(e), param) from None
    return prompt, collate_media([media]) if media else {}


def _image_bytes(url: str, max_pixels: int, where: str) -> bytes:
    """The bytes of an image given as a data: URL, checked to be one Pillow reads, and not too big."""
    from PIL import Image, UnidentifiedImageError

    if not url.startswith("data:"):
        raise ApiError(400, "images must be data: URLs (this server fetches nothing)", where)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ApiError(400, "an image data: URL must be base64-encoded", where)
    data = _base64(payload, where)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, "the image cannot be decoded", where, "invalid_image") from None
    if width * height > max_pixels:
        raise ApiError(
            400,
            f"the image is {width}×{height} = {width * height:,} pixels; at most {max_pixels:,}",
            where,
            "image_too_large",
        )
    return data


def _audio_bytes(audio: InputAudio, where: str) -> bytes:
    if audio.format not in AUDIO_FORMATS:
        raise ApiError(400, f"audio format must be one of {', '.join(AUDIO_FORMATS)}", where)
    return _base64(audio.data, where)


def _base64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data is not valid base64", where) from None


# -- what is sent back ----------------------------------------------------------------------------


@dataclass
class Meta:
    """What every response and chunk of one request repeats."""

    id: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, model: str) -> Meta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", model, int(time.time()))

    def envelope(self, kind: str, choices: list[dict]) -> dict:
        """The fields every response and chunk of the request carries, around its choices."""
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_chunk(meta: Meta, choices: list[dict], usage_: dict | None = None, with_usage=False):
    chunk = meta.envelope("chat.completion.chunk", choices)
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def chat_delta(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_response(meta: Meta, choices: list[dict], usage_: dict) -> dict:
    return {**meta.envelope("chat.completion", choices), "usage": usage_}


def chat_choice(index: int, text: str, reason: str, logprobs=None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def completion_object(meta: Meta, choices: list[dict], usage_: dict | None = None, chunk=False):
    out = meta.envelope("text_completion", choices)
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def completion_choice(index: int, text: str, reason: str | None, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


class LogprobWriter:
    """Token log-probabilities in the API's two shapes: chat's `{"content": [...]}` and the
    completions API's `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`."""

    def __init__(self, tokenizer: Tokenizer):
        self.texts = tokenizer.token_texts()

    def chat(self, logprobs: list[TokenLogprob]) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self.texts[token]
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
            for t in logprobs
        ]
        return {"content": content, "refusal": None}

    def completion(self, logprobs: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.texts[t.id] for t in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{self.texts[i]: lp for i, lp in t.top} for t in logprobs],
            "text_offset": offsets,
        }
