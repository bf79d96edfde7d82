import json

import numpy as np
import pytest
import torch

from omnigpt.data import RandomWindows, load_tokens, prepare, sequential_windows, stdlib_corpus
from omnigpt.errors import OmnigptError
from omnigpt.tokenizer import IGNORE_INDEX, Tokenizer
from tests.conftest import CORPUS


def test_prepare_text_file_char(tmp_path, corpus_file):
    summary = prepare([corpus_file], tmp_path / "out", "char", val_fraction=0.1, progress=False)
    train, val = load_tokens(tmp_path / "out/train.bin"), load_tokens(tmp_path / "out/val.bin")
    assert train.dtype == np.uint16
    assert summary.tokens == len(CORPUS) + 1 == len(train) + len(val)  # one end-of-text token
    assert len(val) == int(summary.tokens * 0.1)
    tok = Tokenizer.load(tmp_path / "out")
    assert tok.decode(np.concatenate([train, val]).tolist()) == CORPUS + "<|endoftext|>"
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["documents"] == 1 and meta["bytes_per_token"] == pytest.approx(
        len(CORPUS) / (len(CORPUS) + 1)
    )


def test_prepare_folder_recursively_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "a/b").mkdir(parents=True)
    (src / "one.txt").write_text("first document")
    (src / "a/b/two.md").write_text("second document")
    (src / ".hidden").write_text("never read")
    (src / "a/docs.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n"
    )
    summary = prepare([src], tmp_path / "out", "bpe:300", val_fraction=0.0, progress=False)
    assert summary.documents == 4
    text = Tokenizer.load(tmp_path / "out").decode(load_tokens(tmp_path / "out/train.bin").tolist())
    for piece in ("first document", "second document", "third", "fourth"):
        assert piece in text
    assert "never read" not in text


def test_bad_corpora_are_clear(tmp_path):
    with pytest.raises(OmnigptError, match="no such file"):
        prepare([tmp_path / "missing.txt"], tmp_path / "out", "char", progress=False)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(OmnigptError, match="is empty"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", "char", progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(
        OmnigptError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"
    ):
        prepare([tmp_path / "latin1.txt"], tmp_path / "out", "char", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(OmnigptError, match=r"bad.jsonl:2: malformed JSON"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out", "char", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_skip_bad_files(tmp_path, corpus_file):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    summary = prepare(
        [corpus_file, tmp_path / "latin1.txt"],
        tmp_path / "out",
        "char",
        skip_bad_files=True,
        progress=False,
    )
    assert summary.documents == 1


def test_random_windows_are_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    a = RandomWindows(tokens, 16, 4, seed=1)
    b = RandomWindows(tokens, 16, 4, seed=1)
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(ya[:, :-1], xa[:, 1:]) and torch.equal(ya[:, -1], xa[:, -1] + 1)
    state = a.state_dict()
    nxt = a.next_batch()
    a.load_state_dict(state)
    assert torch.equal(a.next_batch()[0], nxt[0])


def test_ranks_split_the_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    whole = RandomWindows(tokens, 8, 6, seed=3).next_batch()[0]
    parts = [
        RandomWindows(tokens, 8, 3, seed=3, rank=r, world_size=2).next_batch()[0] for r in range(2)
    ]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])


def test_sequential_windows_cover_every_token_once():
    tokens = np.arange(1, 104, dtype=np.uint16)  # 103 tokens: 102 targets
    targets = torch.cat([y[y != IGNORE_INDEX] for _, y in sequential_windows(tokens, 10, 3)])
    assert targets.tolist() == list(range(2, 104))
    sampled = list(sequential_windows(tokens, 10, 3, max_batches=2))
    assert len(sampled) == 2
    per_rank = [list(sequential_windows(tokens, 10, 1, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) + len(per_rank[1]) == 11


def test_too_few_tokens_for_the_window():
    with pytest.raises(OmnigptError, match="too few"):
        RandomWindows(np.arange(10, dtype=np.uint16), 16, 2, seed=0)


def test_builtin_corpus_is_the_stdlib():
    files = stdlib_corpus()
    names = {f.name for f in files}
    assert "os.py" in names and len(files) > 100
    assert not any("test" in f.parts for f in files)
