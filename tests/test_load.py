"""One loader for every kind of model: run folders, checkpoint folders and LoRA runs (HF folders and
Hub names are tested beside the GPT-2 format, in test_hf.py)."""

import pytest
import torch

from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.config import LoRAConfig
from omnigpt.errors import OmnigptError
from omnigpt.load import load_model
from omnigpt.lora import add_lora
from tests.conftest import tiny_model


def _same_weights(a, b) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def test_a_run_folder_loads_its_best_checkpoint_else_its_latest(tmp_path, char_tokenizer):
    best, latest = tiny_model(char_tokenizer.vocab_size), tiny_model(char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "run/latest", latest, char_tokenizer)
    model, tok = load_model(tmp_path / "run")
    assert _same_weights(model, latest) and tok.fingerprint == char_tokenizer.fingerprint
    save_checkpoint(tmp_path / "run/best", best, char_tokenizer)
    assert _same_weights(load_model(tmp_path / "run")[0], best)
    assert _same_weights(load_model(tmp_path / "run/latest")[0], latest)
    assert not load_model(tmp_path / "run")[0].training  # ready to generate
    with pytest.raises(OmnigptError, match="no such checkpoint or run folder"):
        load_model(tmp_path / "nowhere")


def test_an_adapter_checkpoint_loads_onto_its_base_through_the_one_loader(tmp_path, char_tokenizer):
    base = tiny_model(char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "base", base, char_tokenizer)
    tuned = tiny_model(char_tokenizer.vocab_size)
    tuned.load_state_dict(base.state_dict())
    add_lora(tuned, LoRAConfig(rank=2))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    lora = {"finetune": {"lora": LoRAConfig(rank=2).to_dict()}, "base": str(tmp_path / "base")}
    save_checkpoint(tmp_path / "adapter", tuned, char_tokenizer, extra_config=lora)
    with pytest.raises(OmnigptError, match="omnigpt.load.load_model"):
        load_checkpoint(tmp_path / "adapter")
    model, _ = load_model(tmp_path / "adapter")
    x = torch.randint(0, char_tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], tuned.eval()(x)[0])
        assert not torch.allclose(model(x)[0], base(x)[0])
