"""Parity with Hugging Face `transformers` on tiny random GPT-2 models built here (no downloads)."""

import json
import os
import shutil

import pytest
import torch

from omnigpt.cli import main
from omnigpt.config import ModelConfig
from omnigpt.errors import OmnigptError
from omnigpt.generate import GenerationOptions, generate_tokens
from omnigpt.hf import export_hf
from omnigpt.load import load_model
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer
from tests.conftest import CORPUS

transformers = pytest.importorskip("transformers")

SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=16, n_positions=64),
    dict(n_layer=3, n_head=4, n_embd=32, n_positions=80, n_inner=48),
    dict(n_layer=1, n_head=1, n_embd=24, n_positions=64, tie_word_embeddings=False),
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer.train_bpe([CORPUS], vocab_size=331)
    assert tok.vocab_size % 2 == 1  # an odd vocabulary size, as the parity tests ask
    return tok


def make_hf_model(folder, tok: Tokenizer, shape: dict, weights: str = "safetensors"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=tok.vocab_size, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id, **shape
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so every tensor matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    if weights == "bin":
        state = {k: v for k, v in hf.state_dict().items()}
        state["transformer.h.0.attn.bias"] = torch.tril(
            torch.ones(1, 1, 8, 8)
        )  # old checkpoints' buffer
        os.remove(folder / "model.safetensors")
        torch.save(state, folder / "pytorch_model.bin")
    tok.save(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    return hf


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_greedy_tokens_and_text_match_transformers(tmp_path, bpe, shape):
    hf = make_hf_model(tmp_path, bpe, shape)
    ours, tok = load_model(tmp_path)
    x = torch.randint(0, bpe.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=1e-5)

    prompts = [bpe.encode("def add(a, b):"), bpe.encode("class"), bpe.encode("    return a")]
    ours_tokens = generate_tokens(
        ours, prompts, GenerationOptions(max_new_tokens=30, temperature=0, stop_at_eot=False)
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for prompt, got in zip(prompts, ours_tokens, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=30,
                min_new_tokens=30,
                do_sample=False,
                pad_token_id=bpe.eot_id,
            )[0, len(prompt) :].tolist()
        assert got == ref
        assert tok.decode(prompt + got) == hf_tok.decode(prompt + ref)


def test_pytorch_model_bin_is_read_safely(tmp_path, bpe):
    hf = make_hf_model(tmp_path, bpe, SHAPES[0], weights="bin")
    ours, _ = load_model(tmp_path)
    x = torch.randint(0, bpe.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=1e-5)

    # a pickle that would run code is refused by weights_only loading
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"transformer.wte.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OmnigptError, match="corrupt, truncated or unsafe"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "variant", [dict(), dict(pos_encoding="sinusoidal"), dict(tie_embeddings=False)]
)
def test_export_round_trip_through_transformers(tmp_path, bpe, variant):
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(
            vocab_size=bpe.vocab_size + 5, block_size=64, n_layer=2, n_head=2, n_embd=16, **variant
        )
    ).eval()
    export_hf(model, bpe, tmp_path / "out")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, bpe.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, model(x)[0], atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok.decode(bpe.encode(CORPUS[:80])) == CORPUS[:80]
    reloaded, _ = load_model(tmp_path / "out")  # and back into omnigpt
    torch.testing.assert_close(reloaded(x)[0], model(x)[0], atol=1e-6, rtol=1e-6)


def test_export_refuses_architectures_without_a_gpt2_equivalent(tmp_path, bpe):
    model = GPT(
        ModelConfig(
            vocab_size=bpe.vocab_size,
            block_size=32,
            n_layer=1,
            n_head=2,
            n_embd=16,
            pos_encoding="rope",
            norm="rmsnorm",
        )
    )
    with pytest.raises(OmnigptError, match="GPT-2 has no rotary positions, RMSNorm"):
        export_hf(model, bpe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_hf_folders_are_clear(tmp_path, bpe):
    make_hf_model(tmp_path / "m", bpe, SHAPES[0])
    no_config = tmp_path / "noconfig"
    shutil.copytree(tmp_path / "m", no_config)
    os.remove(no_config / "config.json")
    with pytest.raises(OmnigptError, match="config.json: file not found"):
        load_model(no_config)
    broken = tmp_path / "noweights"
    shutil.copytree(tmp_path / "m", broken)
    os.remove(broken / "model.safetensors")
    with pytest.raises(OmnigptError, match="no weights"):
        load_model(broken)
    llama = tmp_path / "llama"
    shutil.copytree(tmp_path / "m", llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(OmnigptError, match="unsupported architecture 'llama'"):
        load_model(llama)
    wrong = tmp_path / "wrong"
    shutil.copytree(tmp_path / "m", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(OmnigptError, match="has shape"):
        load_model(wrong)
    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "m", truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OmnigptError, match="corrupt or truncated"):
        load_model(truncated)
    assert main(["convert", "--from-hf", str(truncated), "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()  # nothing written half-way


def test_hub_names_resolve_through_the_local_cache(tmp_path, bpe, monkeypatch):
    snapshot = tmp_path / "hf/hub/models--someone--tiny-gpt2/snapshots/abc123"
    snapshot.mkdir(parents=True)
    hf = make_hf_model(snapshot, bpe, SHAPES[0])
    (tmp_path / "hf/hub/models--someone--tiny-gpt2/refs").mkdir()
    (tmp_path / "hf/hub/models--someone--tiny-gpt2/refs/main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, _ = load_model("someone/tiny-gpt2")
    x = torch.randint(0, bpe.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(OmnigptError, match="nor a model in the local Hugging Face cache"):
        load_model("someone/not-cached")


def greedy_cli(model) -> int:
    """`omnigpt generate`: 5 greedy tokens after "def"."""
    return main(
        ["generate", "--model", str(model), "def", "--max-new-tokens", "5", "--temperature", "0"]
    )


def test_cli_convert_both_ways_and_generate(tmp_path, bpe, capsys):
    make_hf_model(tmp_path / "hf", bpe, SHAPES[0])
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "converted" in capsys.readouterr().out
    assert greedy_cli(tmp_path / "run") == 0
    from_run = capsys.readouterr().out
    assert greedy_cli(tmp_path / "hf") == 0
    assert capsys.readouterr().out == from_run  # the HF folder and its conversion generate alike
    assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_imported_model_fine_tunes_like_any_run(tmp_path, bpe, capsys):
    make_hf_model(tmp_path / "hf", bpe, SHAPES[0])
    (tmp_path / "corpus.txt").write_text(CORPUS)
    assert (
        main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base")]) == 0
    )
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "corpus.txt"),
                "--out",
                str(tmp_path / "data"),
                "--tokenizer",
                str(tmp_path / "base"),
            ]
        )
        == 0
    )
    args = [
        "train",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(tmp_path / "ft"),
        "--init-from",
        str(tmp_path / "base"),
        "--batch-size",
        "4",
        "--eval-interval",
        "5",
        "--no-progress",
    ]
    assert main([*args, "--max-steps", "10"]) == 0
    assert (
        main(
            [
                "train",
                "--resume",
                "--out",
                str(tmp_path / "ft"),
                "--max-steps",
                "15",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "ft/summary.json").read_text())
    assert summary["steps"] == 15


def test_an_exported_model_serves_in_the_transformers_pipeline(tmp_path, code_model):
    """What vLLM or TGI would be given: a folder `convert --to-hf` wrote, loaded and run by
    transformers' own text-generation pipeline, greedy, as omnigpt generates."""
    from omnigpt.generate import generate_text

    model, tok = code_model
    export_hf(model, tok, tmp_path / "out")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "out"), device="cpu")
    [result] = pipe("def add", max_new_tokens=20, do_sample=False, return_full_text=False)
    opts = GenerationOptions(max_new_tokens=20, temperature=0, token_healing=False)
    [ours] = generate_text(model, tok, ["def add"], opts)
    assert result["generated_text"] == ours and len(ours) >= 10
