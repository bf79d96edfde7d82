"""Examples: JSONL records checked, encoded within the context, and cut into padded or packed
batches that split exactly across processes."""

import pytest
import torch

from omnigpt.errors import OmnigptError
from omnigpt.examples import (
    ExampleBatches,
    encode_records,
    eval_batches,
    pack_rows,
    read_records,
)
from omnigpt.tokenizer import IGNORE_INDEX
from tests.conftest import reversal_examples, tiny_model


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
    kept, stats = encode_records(tok, records, block_size=12, too_long="truncate")
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 1)
    assert all(len(x) <= 12 for x, _ in kept)
    kept, stats = encode_records(tok, records, block_size=12, too_long="drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 2)


def test_packed_rows_do_not_leak_attention_between_examples(tok):
    _, examples = reversal_examples(tok, 5)
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
    _, examples = reversal_examples(tok, 6)
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
    _, examples = reversal_examples(tok, 40)
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
