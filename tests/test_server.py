"""`omnigpt serve` through the official `openai` client (max_retries=0) against a server on
127.0.0.1: answers equal the engine-free decoder's, streams, stop strings, seeds, media in messages,
transcription, drawing, every refusal in the OpenAI error shape, disconnects, health and metrics."""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import io
import json
import logging
import time

import httpx
import numpy as np
import pytest
import soundfile
import torch
from conftest import running_server, slowed

from omnigpt.config import AudioConfig, GenerationOptions, ModelConfig, ServeConfig, VisionConfig
from omnigpt.examples import collate_media, encode_prompt, media_loader
from omnigpt.generate import generate_tokens
from omnigpt.model import GPT
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.pixels import ImageCodec
from omnigpt.quantize import quantize_int8
from omnigpt.server import Service
from omnigpt.synthetic import TRANSCRIBE_PROMPT
from omnigpt.template import render_conversation, stop_ids
from omnigpt.tokenizer import AUDIO, IMAGE, Tokenizer

openai = pytest.importorskip("openai")

VISION = VisionConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=16, shuffle=2)
HEARING = AudioConfig(
    sample_rate=8000, n_fft=200, hop_length=80, n_mels=20, max_seconds=1.0,
    n_layer=1, n_head=2, n_embd=16, stack=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def served(code_model):
    """The trained tiny code model with random image and audio encoders, served as "tiny"."""
    gpt, tok = code_model
    torch.manual_seed(1)
    model = MultimodalGPT(gpt, VISION, HEARING, tok.token_id(IMAGE), tok.token_id(AUDIO)).eval()
    service = Service(ServeConfig(max_running=4, max_waiting=8, max_image_pixels=100 * 100))
    service.attach(model, tok, "tiny")
    with running_server(service) as url:
        yield url, service, model, tok


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def alone(model, tok, prompt_ids, max_new=20, inputs=None, stops=None) -> list[int]:
    """What the decoder generates greedily for one prompt, without the server or its engine."""
    opts = GenerationOptions(max_new_tokens=max_new, temperature=0)
    stops = stop_ids(tok) if stops is None else stops
    return generate_tokens(model, [prompt_ids], opts, stops, tok.vocab_size, prefill_inputs=inputs)[
        0
    ]


def chat_ids(tok, text: str) -> list[int]:
    return render_conversation(tok, [{"role": "user", "content": text}])


def png(size=(16, 16), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float, rate=8000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(
        buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV"
    )
    return buffer.getvalue()


def data_url(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def status_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the OpenAI error shape
    return caught.value


# -- answers ---------------------------------------------------------------------------------------


def test_chat_and_completions_answer_as_the_decoder_alone(served, client):
    _, _, model, tok = served
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "def add"}], max_tokens=20,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    expected = alone(model, tok, chat_ids(tok, "def add"))
    [choice] = reply.choices
    assert choice.message.content == tok.decode(expected)
    assert choice.finish_reason == ("length" if len(expected) == 20 else "stop")
    assert reply.usage.prompt_tokens == len(chat_ids(tok, "def add"))
    assert reply.usage.completion_tokens == len(expected)
    assert [t.token for t in choice.logprobs.content] == [tok.decode([i]) for i in expected]
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert all(t.logprob <= t.top_logprobs[0].logprob + 1e-6 for t in choice.logprobs.content)

    prompts = ["def ", "class Po"]
    batch = client.completions.create(
        model="tiny", prompt=prompts, n=2, max_tokens=12, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    answers = [alone(model, tok, tok.encode(p), 12, stops=[tok.eot_id]) for p in prompts]
    assert [c.text for c in batch.choices] == [tok.decode(a) for a in answers for _ in range(2)]
    assert batch.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert batch.usage.completion_tokens == 2 * sum(len(a) for a in answers)
    ids = client.completions.create(model="tiny", prompt=tok.encode("def "), max_tokens=12,
                                    temperature=0)  # fmt: skip
    assert ids.choices[0].text == batch.choices[0].text  # a prompt of token ids


def test_streaming_chat_with_usage_ends_with_done(served, client):
    url, _, model, tok = served
    messages = [{"role": "user", "content": "class Point"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=24, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    body = {"model": "tiny", "messages": messages, "max_tokens": 5, "stream": True}
    raw = httpx.post(url + "/v1/chat/completions", json=body).text
    assert raw.endswith("data: [DONE]\n\n") and raw.count("data: ") >= 4


def test_stop_strings_split_across_tokens_are_cut_and_never_streamed(served, client):
    _, _, model, tok = served
    text = tok.decode(alone(model, tok, chat_ids(tok, "def add"), 30))
    stop = text[6:9]  # three characters: three tokens of a character tokenizer
    cut = text.index(stop)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "def add"}], max_tokens=30,
            temperature=0, stop=[stop, "never"], stream=True,
        )
        if c.choices
    ]  # fmt: skip
    assert "".join(pieces) == text[:cut]
    completion = client.completions.create(
        model="tiny", prompt="x = ", max_tokens=30, temperature=0, stop="\n"
    )
    assert "\n" not in completion.choices[0].text and completion.choices[0].finish_reason == "stop"


def test_seeds_repeat_and_choices_differ(client):
    def ask(seed, n=1):
        return client.completions.create(
            model="tiny", prompt="def ", max_tokens=16, temperature=1.0, seed=seed, n=n
        )

    first, again, other = ask(3), ask(3), ask(4)
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    three = ask(3, n=3)
    assert three.choices[0].text == first.choices[0].text
    assert len({c.text for c in three.choices}) == 3


def test_greedy_answers_in_a_busy_batch_equal_answers_alone(served, client):
    _, service, model, tok = served
    prompts = ["def sub", "class", "    self.", "return a", "x", "def __init__"]

    def ask(p):
        return (
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": p}],
                max_tokens=25,
                temperature=0,
            )
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        busy = list(pool.map(ask, prompts))  # 6 requests, 4 slots: they join as others leave
    assert busy == [tok.decode(alone(model, tok, chat_ids(tok, p), 25)) for p in prompts]


# -- media -----------------------------------------------------------------------------------------


def test_images_and_audio_in_messages_reach_the_model(served, client):
    _, _, model, tok = served
    image, clip = png(), wav(0.5)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "describe"},
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"},
        },
    ]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=15, temperature=0
    )
    record = {"messages": [{"role": "user", "content": f"{IMAGE}describe{AUDIO}"},
                           {"role": "assistant", "content": ""}], "image": [image], "audio": [clip]}  # fmt: skip
    prompt, media = encode_prompt(tok, record, media_loader(model))
    expected = alone(model, tok, prompt, 15, collate_media([media]))
    assert reply.choices[0].message.content == tok.decode(expected)
    text_only = len(chat_ids(tok, "describe"))
    assert reply.usage.prompt_tokens == len(prompt) > text_only + VISION.tokens

    other = client.chat.completions.create(
        model="tiny", max_tokens=15, temperature=0,
        messages=[{"role": "user", "content": [content[0] | {"image_url": {"url": data_url(png(colour=(0, 0, 255)))}}, content[1]]}],
    )  # fmt: skip
    record = {"messages": [{"role": "user", "content": f"{IMAGE}describe"},
                           {"role": "assistant", "content": ""}], "image": [png(colour=(0, 0, 255))]}  # fmt: skip
    prompt, media = encode_prompt(tok, record, media_loader(model))
    assert other.choices[0].message.content == tok.decode(
        alone(model, tok, prompt, 15, collate_media([media]))
    )


def test_media_that_cannot_be_used_is_refused(client):
    def send(part):
        return lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": [part]}], max_tokens=3
        )

    def image(url):
        return send({"type": "image_url", "image_url": {"url": url}})

    e = status_of(image(data_url(b"not an image at all")))
    assert e.status_code == 400 and e.body["code"] == "invalid_image"
    e = status_of(image(data_url(png((101, 100)))))
    assert e.status_code == 400 and "10,100 pixels; at most 10,000" in e.body["message"]
    assert status_of(image("data:image/png;base64,@@@")).status_code == 400
    e = status_of(image("https://example.com/cat.png"))
    assert e.status_code == 400 and "fetches nothing" in e.body["message"]
    long_clip = base64.b64encode(wav(1.5)).decode()
    e = status_of(
        send({"type": "input_audio", "input_audio": {"data": long_clip, "format": "wav"}})
    )
    assert e.status_code == 400 and "longer than the model's 1 s" in e.body["message"]
    e = status_of(
        send({"type": "input_audio", "input_audio": {"data": long_clip, "format": "aiff"}})
    )
    assert e.status_code == 400 and e.body["param"] == "messages.0.content.0"


def test_transcription_of_an_uploaded_file(served, client):
    _, _, model, tok = served
    clip = wav(0.6)
    result = client.audio.transcriptions.create(model="tiny", file=("clip.wav", clip))
    record = {"prompt": TRANSCRIBE_PROMPT, "audio": clip}
    prompt, media = encode_prompt(tok, record, media_loader(model))
    expected = alone(model, tok, prompt, 96, collate_media([media]), stop_ids(tok, record))
    assert result.text == tok.decode(expected).strip()
    text = client.audio.transcriptions.create(
        model="tiny", file=("clip.wav", clip), response_format="text"
    )
    assert text.strip() == result.text
    e = status_of(lambda: client.audio.transcriptions.create(model="tiny", file=("x.wav", b"RIFF")))
    assert e.status_code == 400 and "cannot read audio" in e.body["message"]


# -- refusals ---------------------------------------------------------------------------------------


def test_each_refusal_has_its_status_and_the_openai_error_shape(served, client):
    url, _, _, tok = served
    messages = [{"role": "user", "content": "hi"}]
    e = status_of(lambda: client.chat.completions.create(model="gpt-4", messages=messages))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    e = status_of(lambda: client.chat.completions.create(model="tiny", messages=messages,
                                                         extra_body={"mirostat": 2}))  # fmt: skip
    assert (
        e.status_code == 400
        and e.body["param"] == "mirostat"
        and "Unrecognized" in e.body["message"]
    )
    e = status_of(
        lambda: client.chat.completions.create(model="tiny", messages=messages, temperature=3)
    )
    assert e.status_code == 400 and e.body["param"] == "temperature"
    e = status_of(lambda: client.chat.completions.create(model="tiny", messages=messages,
                                                         presence_penalty=0.5))  # fmt: skip
    assert e.status_code == 400 and e.body["param"] == "presence_penalty"
    long = [{"role": "user", "content": "x" * 120}]
    e = status_of(lambda: client.chat.completions.create(model="tiny", messages=long))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    n = len(chat_ids(tok, "x" * 120))
    assert (
        f"maximum context length is 96 tokens. However, your prompt is {n} tokens"
        in e.body["message"]
    )
    e = status_of(lambda: client.completions.create(model="tiny", prompt="def ", max_tokens=95))
    assert e.status_code == 400 and "(4 in the prompt, 95 for the answer)" in e.body["message"]
    e = status_of(lambda: client.completions.create(model="tiny", prompt="a", n=5))
    assert e.status_code == 400 and e.body["param"] == "n"
    bad = httpx.post(
        url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/v1/nothing").status_code == 404


@pytest.fixture(scope="module")
def strict(code_model):
    """A server with one slot, one waiting place, a 0.05 MB body limit and an API key."""
    gpt, tok = code_model
    service = Service(ServeConfig(max_running=1, max_waiting=1, max_body_mb=0.05, api_key="sekret"))
    service.attach(gpt, tok, "tiny")
    slowed(service.engine, 0.01)
    with running_server(service) as url:
        yield url, service


def test_limits_busy_body_and_key(strict):
    url, service = strict
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    e = status_of(
        lambda: openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    )
    assert e.status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # health needs no key
    e = status_of(
        lambda: client.completions.create(model="tiny", prompt="x" * 60_000, max_tokens=1)
    )
    assert e.status_code == 413
    chunked = httpx.post(url + "/v1/completions", content=iter([b"{" + b" " * 60_000 + b"}"]),
                         headers={"authorization": "Bearer sekret"})  # fmt: skip
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives

    def long():
        return client.completions.create(model="tiny", prompt="def ", max_tokens=60, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(long)
        while service.engine.running < 1:
            time.sleep(0.005)
        waiting = pool.submit(long)
        while service.engine.waiting < 1:
            time.sleep(0.005)
        e = status_of(long)
        assert e.status_code == 503 and e.response.headers["retry-after"] == "1"
        assert running.result().choices[0].text == waiting.result().choices[0].text
    metrics = httpx.get(url + "/metrics").text
    assert 'omnigpt_rejected_requests_total{reason="busy"} 1.0' in metrics
    assert 'omnigpt_rejected_requests_total{reason="too_large"} 2.0' in metrics
    assert 'omnigpt_rejected_requests_total{reason="unauthorized"} 1.0' in metrics


def test_a_client_that_leaves_mid_stream_frees_its_slot(strict):
    url, service = strict
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 80, "stream": True}
    headers = {"authorization": "Bearer sekret"}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ") and service.engine.running == 1
    deadline = time.time() + 5
    while service.engine.running and time.time() < deadline:
        time.sleep(0.01)
    assert service.engine.running == 0 and service.engine.waiting == 0
    done = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3},
                      headers=headers)  # fmt: skip
    assert done.status_code == 200  # the slot is free again


def test_health_metrics_and_access_log(served, caplog):
    url, _, _, _ = served
    with caplog.at_level(logging.INFO, logger="omnigpt.server"):
        httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 4})
    assert any('"POST /v1/completions" 200' in r.getMessage() for r in caplog.records)
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "tiny"}
    metrics = httpx.get(url + "/metrics").text
    for name in ("omnigpt_requests_running 0.0", "omnigpt_requests_waiting 0.0",
                 "omnigpt_time_to_first_token_seconds_count", "omnigpt_generated_tokens_total"):  # fmt: skip
        assert name in metrics
    generated = float(metrics.split("\nomnigpt_generated_tokens_total ")[1].split()[0])
    assert generated >= 4


def test_health_is_503_while_the_model_loads_and_models_lists_it(code_model, served):
    service = Service(ServeConfig())
    with running_server(service) as url:
        assert httpx.get(url + "/health").status_code == 503
        loading = httpx.get(url + "/v1/models")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
        service.attach(*code_model, "late")
        assert httpx.get(url + "/health").status_code == 200
        [card] = httpx.get(url + "/v1/models").json()["data"]
        assert card["id"] == "late" and card["max_model_len"] == 96 and card["weights"] == "fp32"
        assert card["capabilities"]["chat"] and not card["capabilities"]["image_input"]
    mm = openai.OpenAI(base_url=served[0] + "/v1", api_key="x", max_retries=0).models.retrieve(
        "tiny"
    )
    assert mm.capabilities["image_input"] and mm.capabilities["audio_input"]


# -- drawing -----------------------------------------------------------------------------------------


def test_images_generations_draws_the_models_images(code_model):
    from PIL import Image

    palette = [(255, 0, 0), (0, 0, 255), (255, 255, 255)]
    tok = Tokenizer.train_char(["a red circle and a blue square"]).with_images(
        ImageCodec.exact(palette, 4)
    )
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    service = Service(ServeConfig())
    service.attach(GPT(cfg.with_image_grid(*tok.image_grid())).eval(), tok, "painter", guidance=1.0)
    with running_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        result = client.images.generate(model="painter", prompt="a red circle", n=2, size="4x4",
                                        extra_body={"seed": 1})  # fmt: skip
        images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
        assert [im.size for im in images] == [(4, 4), (4, 4)]
        colours = {tuple(c) for im in images for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}
        assert colours <= set(palette)
        again = client.images.generate(
            model="painter", prompt="a red circle", n=2, extra_body={"seed": 1}
        )
        assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]
        assert result.usage.output_tokens == 2 * 16
        e = status_of(lambda: client.images.generate(model="painter", prompt="x", size="1024x1024"))
        assert e.status_code == 400 and "4x4" in e.body["message"]
    # a model whose every position points at an image code still answers text with text
    with torch.no_grad():
        service.model.ln_f.weight.zero_()
        service.model.ln_f.bias.copy_(service.model.wte.weight[tok.code_ids.start] * 100)
    shouter = Service(ServeConfig())
    shouter.attach(service.model, tok, "painter")
    with running_server(shouter) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        text = client.completions.create(model="painter", prompt="a ", max_tokens=10, temperature=0)
        assert len(text.choices[0].text) == 10 and "<|code_" not in text.choices[0].text
    service = Service(ServeConfig())
    service.attach(*code_model, "tiny")
    with running_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        e = status_of(lambda: client.images.generate(model="tiny", prompt="a red circle"))
        assert e.status_code == 400 and "does not draw" in e.body["message"]
    assert json.dumps(result.model_dump())  # the whole response is JSON


def test_the_serve_command_answers_and_stops_on_sigterm(tmp_path, code_model):
    import signal
    import socket
    import subprocess
    import sys

    from omnigpt.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "coder", *code_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "omnigpt", "serve", "--model", str(tmp_path / "coder"),
               "--port", str(port), "--device", "cpu", "--quantize", "int8"]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        [card] = client.models.list().data
        assert card.id == "coder" and card.weights == "int8"
        reply = client.completions.create(model="coder", prompt="def ", max_tokens=8, temperature=0)
        model, tok = code_model  # served with int8 weights
        int8 = quantize_int8(copy.deepcopy(model))
        expected = alone(int8, tok, tok.encode("def "), 8, stops=[tok.eot_id])
        assert reply.choices[0].text == tok.decode(expected)
        busy = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2 and f"could not serve on 127.0.0.1:{port}" in busy.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=30)
    assert server.returncode == 0, log
    assert '"POST /v1/completions" 200' in log  # the access log


def test_an_error_mid_stream_is_sent_as_an_error_event(code_model):
    gpt, tok = code_model
    service = Service(ServeConfig())
    service.attach(gpt, tok, "tiny")
    step, steps = service.engine._step, [0]

    def failing_step():  # the engine fails after a few tokens (a bug, or memory running out)
        steps[0] += 1
        if steps[0] > 3:
            raise RuntimeError("boom")
        step()

    service.engine._step = failing_step
    with running_server(service) as url:
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 30, "stream": True}
        events = [
            line
            for line in httpx.post(url + "/v1/completions", json=body).text.split("\n\n")
            if line
        ]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error == {
            "message": "the engine failed: boom",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert len(events) >= 4  # tokens came before it
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        steps[0] = 0
        with pytest.raises(openai.APIError, match="the engine failed: boom"):
            for _ in client.completions.create(
                model="tiny", prompt="def ", max_tokens=30, stream=True
            ):
                pass
        steps[0] = -100  # the engine serves on after a failure
        assert client.completions.create(model="tiny", prompt="a", max_tokens=3).choices[0].text
