import pytest
import torch

from omnigpt.errors import OmnigptError
from omnigpt.generate import (
    GenerationOptions,
    apply_repetition_penalty,
    generate_text,
    generate_tokens,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from omnigpt.model import GPT
from tests.conftest import tiny_model

GREEDY = GenerationOptions(max_new_tokens=12, temperature=0.0, stop_at_eot=False)


def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # ≈ .03 .64 .24 .09
    kept = ~torch.isinf(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] + probs[2] >= 0.8
    assert (~torch.isinf(top_p_filter(logits, 0.5))).sum() == 1  # the top token alone


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_greedy_at_zero_temperature_and_seeded_otherwise():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, GenerationOptions(temperature=0)), logits.argmax(-1))
    opts = GenerationOptions(temperature=1.0, top_k=10)
    a = sample_next(logits, opts, torch.Generator().manual_seed(1))
    b = sample_next(logits, opts, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert all(int(a[i]) in logits[i].topk(10).indices.tolist() for i in range(4))


@pytest.mark.parametrize(
    "variant", [dict(), dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm")]
)
def test_cached_batched_greedy_equals_recomputation(variant):
    model = tiny_model(**variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3], [1, 2, 3, 4]]
    batched = generate_tokens(model, prompts, GREEDY)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == greedy_without_cache(model, prompt, 12)
        assert (
            generate_tokens(model, [prompt], GREEDY)[0] == got
        )  # alone, on the unpadded fast path


def test_cached_logits_equal_recomputation_for_padded_batch():
    model = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4]]
    seen_logits = []

    # Run the engine and record each step's chosen tokens; then recompute logits from scratch.
    outs = generate_tokens(model, prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        seq = torch.tensor([prompt + out])
        full, _ = model(seq)
        caches = model.make_caches(1, seq.size(1))
        step_logits = [model(seq[:, : len(prompt)], caches=caches)[0][:, -1]]
        for t in range(len(prompt), seq.size(1) - 1):
            step_logits.append(model(seq[:, t : t + 1], caches=caches, start_pos=t)[0][:, -1])
        seen_logits.append(torch.cat(step_logits))
        torch.testing.assert_close(
            seen_logits[-1], full[0, len(prompt) - 1 : -1], atol=1e-5, rtol=1e-5
        )


def test_stops_at_end_of_text():
    model = tiny_model()
    first = generate_tokens(model, [[1, 2, 3]], GREEDY)[0]
    eot = first[3]  # pretend the 4th generated token is end-of-text
    stopped = generate_tokens(
        model, [[1, 2, 3]], GenerationOptions(max_new_tokens=12, temperature=0), eot_id=eot
    )
    assert stopped[0] == first[: first.index(eot)]


def test_vocab_limit_restricts_sampling():
    model = tiny_model()
    out = generate_tokens(
        model,
        [[1, 2]],
        GenerationOptions(max_new_tokens=30, temperature=2.0, seed=0),
        vocab_limit=5,
    )
    assert out[0] and max(out[0]) < 5


def test_prompt_longer_than_context_is_refused_and_output_is_clamped():
    model = tiny_model(block_size=16)
    with pytest.raises(OmnigptError, match="longer than the model's context of 16"):
        generate_tokens(model, [list(range(17))], GREEDY)
    out = generate_tokens(
        model, [list(range(10))], GenerationOptions(max_new_tokens=50, temperature=0)
    )
    assert len(out[0]) == 6


def test_generate_text_streams_and_honours_stop_strings(char_tokenizer):
    model = tiny_model(vocab_size=char_tokenizer.vocab_size + 10)
    opts = GenerationOptions(max_new_tokens=40, temperature=1.5, seed=3, stop_at_eot=False)
    streamed: dict[int, str] = {0: "", 1: ""}
    texts = generate_text(
        model,
        char_tokenizer,
        ["def ", "class "],
        opts,
        on_text=lambda i, piece: streamed.__setitem__(i, streamed[i] + piece),
    )
    assert [streamed[0], streamed[1]] == texts
    assert len(texts[0]) > 0
    # the same sampling run with a stop string taken from its own output ends right before it
    stop = texts[1][5:7]
    cut = generate_text(
        model,
        char_tokenizer,
        ["def ", "class "],
        GenerationOptions(
            max_new_tokens=40, temperature=1.5, seed=3, stop_at_eot=False, stop_strings=(stop,)
        ),
    )
    assert cut[1] == texts[1][: texts[1].find(stop)]


def test_num_samples_and_seeds(char_tokenizer):
    model = tiny_model(vocab_size=char_tokenizer.vocab_size)
    opts = GenerationOptions(
        max_new_tokens=20, temperature=1.0, num_samples=3, seed=7, stop_at_eot=False
    )
    a = generate_text(model, char_tokenizer, ["x"], opts)
    assert len(a) == 3 and len(set(a)) > 1
    assert generate_text(model, char_tokenizer, ["x"], opts) == a


def test_bad_options_are_clear():
    with pytest.raises(OmnigptError, match="top_p"):
        GenerationOptions(top_p=1.5)
    with pytest.raises(OmnigptError, match="temperature"):
        GenerationOptions(temperature=-1)


def test_first_token_restriction():
    model = tiny_model()
    out = generate_tokens(model, [[1, 2], [3, 4]], GREEDY, first_allowed=[[7, 9], None])
    assert out[0][0] in (7, 9)
    assert out[1] == generate_tokens(model, [[3, 4]], GREEDY)[0]


def test_generate_text_with_token_healing(monkeypatch):
    from omnigpt import generate as gen
    from omnigpt.tokenizer import Tokenizer
    from tests.conftest import CORPUS

    tok = Tokenizer.train_bpe([CORPUS], vocab_size=400)
    model = tiny_model(vocab_size=400)
    engine, generated = gen.generate_tokens, []

    def recording_engine(*args, **kwargs):
        generated.extend(engine(*args, **kwargs)[0])
        return [generated]

    monkeypatch.setattr(gen, "generate_tokens", recording_engine)
    opts = GenerationOptions(max_new_tokens=5, temperature=1.0, seed=0, stop_at_eot=False)
    text = generate_text(model, tok, ["def "], opts)[0]
    # the model continued from "def", its first token re-creating the space; the text excludes it
    assert tok.token_texts()[generated[0]].startswith(" ")
    assert "def " + text == "def" + tok.decode(generated)
