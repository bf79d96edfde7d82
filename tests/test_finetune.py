import json
import random

import pytest
import torch

from omnigpt.chat import format_chat, parse_chat, read_records, render, render_conversation
from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.errors import OmnigptError
from omnigpt.evaluate import evaluate
from omnigpt.finetune import (
    ExampleBatches,
    FinetuneConfig,
    eval_batches,
    finetune,
    pack_rows,
    tokenize_records,
)
from omnigpt.generate import GenerationOptions
from omnigpt.hf import load_model
from omnigpt.lora import LoRAConfig, adapter_state, add_lora, lora_layers, merge_lora
from omnigpt.model import GPT, IGNORE_INDEX
from omnigpt.tokenizer import ASSISTANT, END_OF_TURN, EOT, USER, Tokenizer
from tests.conftest import single_and_two_process_runs, tiny_model

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <|end|> 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz0123456789 =+?,.<>|AW"])


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# -- the chat template and loss mask --------------------------------------------------------------


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


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        "{not json\n"
        '{"messages": [{"role": "bot", "content": "hi"}]}\n'
        "\n"
        '{"prompt": "a", "completion": "  "}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"text": "plain"}\n'
    )
    with pytest.raises(OmnigptError) as e:
        read_records(path)
    msg = str(e.value)
    assert "5 bad line(s)" in msg
    for expected in (
        "line 2: malformed JSON",
        "line 3: message 1 has unknown role 'bot'",
        "line 5: empty completion",
        "line 6: no assistant message",
        "line 7: expected 'prompt'",
    ):
        assert expected in msg


def test_too_long_examples_are_truncated_or_dropped(tok):
    records = [
        {"prompt": "ab=", "completion": "ba"},
        {"prompt": "abcdefgh=", "completion": "hgfedcba"},  # 18 tokens with EOT
        {"prompt": "abcdefghijklmnop=", "completion": "xy"},  # prompt alone too long
    ]
    kept, stats = tokenize_records(tok, records, block_size=12, too_long="truncate")
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)
    assert all(len(x) <= 12 for x, _ in kept)
    kept, stats = tokenize_records(tok, records, block_size=12, too_long="drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 2)


# -- batches --------------------------------------------------------------------------------------


def _examples(tok, n=12, seed=0):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        s = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 7)))
        records.append({"prompt": s + "=", "completion": s[::-1]})
    return records, tokenize_records(tok, records, 40)[0]


def test_packed_rows_do_not_leak_attention_between_examples(tok):
    _, examples = _examples(tok, 5)
    model = tiny_model(tok.vocab_size, pos_encoding="rope")
    x, y, extras = pack_rows([examples[:3], examples[3:]], 40, pad_id=1)
    assert (y != IGNORE_INDEX).sum() == sum(
        (torch.tensor(e[1]) != IGNORE_INDEX).sum() for e in examples
    )
    packed_logits, _ = model(x, **extras)
    for row, members in enumerate([examples[:3], examples[3:]]):
        start = 0
        for ex_x, _ in members:
            alone, _ = model(torch.tensor([ex_x]))
            n = len(ex_x)
            torch.testing.assert_close(
                packed_logits[row, start : start + n], alone[0], atol=1e-5, rtol=1e-5
            )
            start += n


def test_padded_batches_give_each_example_its_own_logits(tok):
    _, examples = _examples(tok, 6)
    model = tiny_model(tok.vocab_size)
    x, y, extras = next(eval_batches(examples, 40, 6, pad_id=1))
    assert extras == {}
    logits, _ = model(x)
    by_len = sorted(examples, key=lambda e: len(e[0]))
    for row, (ex_x, _) in enumerate(by_len):
        alone, _ = model(torch.tensor([ex_x]))
        torch.testing.assert_close(logits[row, : len(ex_x)], alone[0], atol=1e-5, rtol=1e-5)
        assert y[row, len(ex_x) :].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("pack", [False, True])
def test_process_slices_make_up_the_global_batch_and_resume_exactly(tok, pack):
    _, examples = _examples(tok, 40)
    whole = ExampleBatches(examples, 40, 4, 1, seed=3, pack=pack)
    parts = [
        ExampleBatches(examples, 40, 2, 1, seed=3, pack=pack, rank=r, world_size=2)
        for r in range(2)
    ]

    def rows(x):  # rows without their trailing padding (pad id 1)
        out = []
        for r in x.tolist():
            while r and r[-1] == 1:
                r.pop()
            out.append(tuple(r))
        return sorted(out)

    for _ in range(7):  # crosses an epoch boundary
        x, y, _ = whole.next_batch()
        assert rows(x) == sorted(sum((rows(p.next_batch()[0]) for p in parts), []))
        assert int((y != IGNORE_INDEX).sum()) > 0
    state = whole.state_dict()
    expected = whole.next_batch()[0]
    again = ExampleBatches(examples, 40, 4, 1, seed=3, pack=pack)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], expected)


# -- what trains ----------------------------------------------------------------------------------


@pytest.fixture
def base_dir(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=48)
    )
    save_checkpoint(tmp_path / "base", model, tok)
    return tmp_path / "base"


@pytest.fixture
def task_files(tmp_path, tok):
    train, _ = _examples(tok, 400, seed=1)
    val, _ = _examples(tok, 40, seed=2)
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", val)
    return tmp_path / "train.jsonl", tmp_path / "val.jsonl"


QUICK = dict(batch_size=16, max_steps=8, eval_interval=4, warmup_steps=2, lr=1e-2, log_interval=1)


def test_partial_finetuning_leaves_frozen_weights_untouched(tmp_path, base_dir, task_files):
    before, _ = load_model(base_dir)
    ft = FinetuneConfig(method="partial", trainable=("ln_f",), last_blocks=1)
    finetune(base_dir, task_files[0], tmp_path / "run", ft, TrainConfig(**QUICK), progress=False)
    after, _ = load_model(tmp_path / "run/latest")
    changed = {
        n
        for (n, a), b in zip(before.state_dict().items(), after.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(n.startswith(("h.1.", "ln_f.")) for n in changed)
    assert any(n.startswith("h.1.") for n in changed) and "ln_f.weight" in changed


def test_frozen_parameters_get_no_gradient(base_dir, tok):
    from omnigpt.finetune import prepare_model

    model, _ = load_model(base_dir)
    line = prepare_model(model, FinetuneConfig(method="partial", trainable=("h.0.mlp",)))
    assert "trainable parameters" in line
    x = torch.randint(0, tok.vocab_size, (2, 10))
    _, loss = model(x, x)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("h.0.mlp."), name
    with pytest.raises(OmnigptError, match="matches no parameter"):
        prepare_model(model, FinetuneConfig(method="partial", trainable=("h.9",)))


# -- LoRA -----------------------------------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_trains_only_adapters(tok):
    model = tiny_model(tok.vocab_size)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    reference, _ = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = add_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each block
    torch.testing.assert_close(model(x)[0], reference)  # B = 0: no change yet
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base[name]), name
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())


def test_lora_merge_algebra(tok):
    model = tiny_model(tok.vocab_size)
    add_lora(model, LoRAConfig(rank=4, alpha=8, targets=("c_attn", "c_fc")))
    for layer in lora_layers(model).values():  # give the adapters non-zero weights
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with_adapter, _ = model(x)
    expected = {
        n: (m.weight + 2.0 * m.lora_B @ m.lora_A).detach().clone()
        for n, m in lora_layers(model).items()
    }
    assert merge_lora(model) == 4
    for name, w in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight, w)
        assert type(model.get_submodule(name)) is torch.nn.Linear
    merged_logits, _ = model(x)
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) == 0  # merging twice changes nothing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_lora_run_saves_small_adapters_that_load_onto_the_base(tmp_path, base_dir, task_files):
    ft = FinetuneConfig(method="lora", lora=LoRAConfig(rank=2, alpha=4))
    finetune(base_dir, task_files[0], tmp_path / "run", ft, TrainConfig(**QUICK), progress=False)
    latest = tmp_path / "run/latest"
    assert not (latest / "model.safetensors").exists()
    adapter_bytes = (latest / "adapter.safetensors").stat().st_size
    assert adapter_bytes < (base_dir / "model.safetensors").stat().st_size / 5
    tuned, _ = load_model(latest)
    base, _ = load_model(base_dir)
    assert set(adapter_state(tuned)) and lora_layers(tuned)
    x = torch.randint(0, 40, (1, 10))
    assert not torch.allclose(tuned(x)[0], base(x)[0])
    with pytest.raises(OmnigptError, match="LoRA adapter checkpoint"):
        load_checkpoint(latest)  # the plain loader says what to use instead
    # merged into the weights, the model gives the same logits without adapters
    before = tuned(x)[0]
    merge_lora(tuned)
    torch.testing.assert_close(tuned(x)[0], before, atol=1e-5, rtol=1e-5)


def test_adapter_on_a_different_base_is_refused(tmp_path, base_dir, task_files, tok):
    ft = FinetuneConfig(method="lora", lora=LoRAConfig(rank=2, alpha=4))
    finetune(base_dir, task_files[0], tmp_path / "run", ft, TrainConfig(**QUICK), progress=False)
    # same shapes, other weights
    torch.manual_seed(1)
    other = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=48)
    )
    save_checkpoint(base_dir, other, tok)
    with pytest.raises(OmnigptError, match="does not match base"):
        load_model(tmp_path / "run")
    with pytest.raises(OmnigptError, match="has changed since the adapters were trained"):
        finetune(base_dir, task_files[0], tmp_path / "run", ft, TrainConfig(**QUICK), resume=True)
    # other shapes
    wider = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    )
    save_checkpoint(base_dir, wider, tok)
    with pytest.raises(OmnigptError, match="another base|does not match"):
        load_model(tmp_path / "run")


def test_lora_resume_matches_an_uninterrupted_run(tmp_path, base_dir, task_files):
    ft = FinetuneConfig(method="lora", lora=LoRAConfig(rank=2, alpha=4))
    cfg = TrainConfig(**{**QUICK, "max_steps": 12})
    finetune(base_dir, task_files[0], tmp_path / "a", ft, cfg, progress=False)
    # b: stop after 8 steps (an evaluation saves latest/), then resume to 12
    cfg_b = TrainConfig(**{**QUICK, "max_steps": 12})
    import omnigpt.finetune as ftmod

    original = ftmod.ExampleBatches.next_batch
    calls = [0]

    def interrupted(self):
        calls[0] += 1
        if calls[0] > 9:
            raise KeyboardInterrupt
        return original(self)

    ftmod.ExampleBatches.next_batch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(base_dir, task_files[0], tmp_path / "b", ft, cfg_b, progress=False)
    finally:
        ftmod.ExampleBatches.next_batch = original
    finetune(base_dir, task_files[0], tmp_path / "b", ft, cfg_b, progress=False, resume=True)
    a, _ = load_model(tmp_path / "a/latest")
    b, _ = load_model(tmp_path / "b/latest")
    for (name, pa), pb in zip(adapter_state(a).items(), adapter_state(b).values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5, msg=name)


# -- a task actually learned ----------------------------------------------------------------------


def test_a_tiny_model_learns_to_reverse_strings(tmp_path, task_files, tok):
    """Reversing 2-7 letter strings, from random weights: 100% on held-out strings in 300 steps
    with Muon (val loss 0.002 measured; AdamW needs about 1,000 steps of twice the batch)."""
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=4, n_embd=64)
    )
    save_checkpoint(tmp_path / "base", model, tok)
    cfg = TrainConfig(
        batch_size=16,
        max_steps=300,
        optimizer="muon",
        lr=3e-3,
        warmup_steps=20,
        eval_interval=100,
        weight_decay=0.0,
    )
    result = finetune(
        tmp_path / "base",
        task_files[0],
        tmp_path / "run",
        FinetuneConfig(method="full", pack=True),
        cfg,
        val_data=task_files[1],
        progress=False,
    )
    assert result.final_val_loss < 0.05
    model, tokenizer = load_model(tmp_path / "run")
    records = read_records(task_files[1])
    summary = evaluate(
        model,
        tokenizer,
        records,
        ["exact_match", "perplexity"],
        GenerationOptions(temperature=0, max_new_tokens=12),
        tmp_path / "eval",
        progress=False,
    )
    assert summary["metrics"]["exact_match"] >= 0.95
    rows = [json.loads(line) for line in open(tmp_path / "eval/predictions.jsonl")]
    assert len(rows) == len(records) and {"prediction", "reference", "exact_match"} <= set(rows[0])
    assert summary["metrics"]["perplexity"] < 1.05


def test_two_process_ddp_lora_matches_single_process(tmp_path, base_dir, task_files):
    from tests.test_train import losses

    common = ["finetune", "--model", str(base_dir), "--data", str(task_files[0])]
    common += ["--method", "lora", "--lora-rank", "2", "--pack", "--max-steps", "6"]
    common += ["--eval-interval", "3", "--log-interval", "1", "--lr", "1e-2", "--no-progress"]
    common += ["--device", "cpu", "--precision", "fp32"]  # exact sums, as in test_train's DDP test
    single_and_two_process_runs(common, tmp_path, batch_size=8)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert a.keys() == b.keys() and len(a) == 6
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5)
    single, _ = load_model(tmp_path / "single/latest")
    ddp, _ = load_model(tmp_path / "ddp/latest")
    for (name, pa), pb in zip(
        adapter_state(single).items(), adapter_state(ddp).values(), strict=True
    ):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=name)
