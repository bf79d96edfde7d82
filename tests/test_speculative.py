"""Speculative decoding: greedy output is plain greedy output; sampling keeps the model's distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from omnigpt.errors import OmnigptError
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.speculative import accept_drafts, speculative_tokens, token_probs


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_plain_greedy_for_batched_prompts_of_different_lengths(code_model, k):
    model, tok = code_model
    torch.manual_seed(3)
    untrained = tiny_model(
        tok.vocab_size, block_size=96, n_layer=1
    )  # a poor draft: many rejections
    prompts = [tok.encode(p) for p in ["def add(a, b):\n", "x", "class Point:\n    def __init__"]]
    opts = GenerationOptions(max_new_tokens=30, temperature=0)
    plain = [generate_tokens(model, [p], opts, tok.eot_id, tok.vocab_size)[0] for p in prompts]
    for draft in (untrained, model):  # the model as its own draft: every proposal is kept
        new, stats = speculative_tokens(
            model, draft, prompts, opts, k, [tok.eot_id], tok.vocab_size
        )
        assert new == plain
        assert 0 < stats.proposed and stats.rounds < 30
    assert stats.acceptance == 1.0
    new, stats = speculative_tokens(
        model, untrained, prompts, opts, k, [tok.eot_id], tok.vocab_size
    )
    assert stats.acceptance < 0.9


def test_the_accept_reject_rule_reproduces_the_models_distribution():
    """With a fixed seed, 400,000 rows: the first token kept (a kept proposal, or the token drawn
    after a rejection) follows the model's p within 0.005 per token (p ≠ q by design); so does the
    token after a kept first proposal, given that proposal."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.50, 0.20, 0.15, 0.10, 0.05], [0.1, 0.1, 0.6, 0.1, 0.1]])
    q = torch.tensor([[0.10, 0.30, 0.40, 0.15, 0.05]])
    B = 400_000
    drafted = torch.multinomial(q.expand(B, -1), 1, replacement=True, generator=g)  # (B, 1)
    accepted, following = accept_drafts(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, g)
    first = torch.where(accepted > 0, drafted[:, 0], following)
    assert (torch.bincount(first, minlength=5) / B - p[0]).abs().max() < 0.005
    bonus = following[accepted == 1]  # all (one) proposals kept: the next comes from p[1]
    assert (torch.bincount(bonus, minlength=5) / len(bonus) - p[1]).abs().max() < 0.005
    assert 0.3 < accepted.float().mean() < 0.8  # p ≠ q: some proposals are rejected


def test_sampling_is_seeded_and_filters_apply_to_both_models(code_model):
    model, tok = code_model
    prompts = [tok.encode("def "), tok.encode("class Po")]
    opts = GenerationOptions(max_new_tokens=20, temperature=0.8, top_k=5, seed=11)
    torch.manual_seed(5)
    draft = tiny_model(tok.vocab_size, block_size=96, n_layer=1)
    first, _ = speculative_tokens(model, draft, prompts, opts, 3, [tok.eot_id], tok.vocab_size)
    again, _ = speculative_tokens(model, draft, prompts, opts, 3, [tok.eot_id], tok.vocab_size)
    assert first == again and all(len(t) == 20 for t in first)
    probs = token_probs(torch.randn(2, 7, tok.vocab_size), opts)
    assert ((probs > 0).sum(-1) <= 5).all() and torch.allclose(probs.sum(-1), torch.ones(2, 7))
    stopped = []
    new, _ = speculative_tokens(
        model, draft, prompts, opts, 3, [tok.eot_id], tok.vocab_size,
        on_tokens=lambda row, ids: stopped.append(row) or row == 0,
    )  # fmt: skip
    assert len(new[0]) <= 4 and len(new[1]) == 20  # row 0 ended after its first round
    with pytest.raises(OmnigptError, match="no room"):
        speculative_tokens(model, draft, [tok.encode("x" * 94)], opts, 3)


def test_generate_with_a_draft_prints_the_same_greedy_text(tmp_path, code_model, capsys):
    from omnigpt.checkpoint import save_checkpoint
    from omnigpt.cli import main
    from omnigpt.tokenizer import Tokenizer

    model, tok = code_model
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "model", model, tok)
    save_checkpoint(tmp_path / "draft", tiny_model(tok.vocab_size, block_size=96, n_layer=1), tok)
    other = Tokenizer.train_char(["abc"])
    save_checkpoint(tmp_path / "stranger", tiny_model(other.vocab_size, block_size=96), other)
    greedy = ["generate", "--model", str(tmp_path / "model"), "def add", "--temperature", "0",
              "--max-new-tokens", "25", "--no-token-healing"]  # fmt: skip
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--draft", str(tmp_path / "draft"), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "proposed tokens kept" in out.err
    assert main([*greedy, "--draft", str(tmp_path / "stranger")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
