"""LoRA: tested through its algebra, and through runs that save, load, resume and refuse adapters."""

import pytest
import torch

from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.config import FinetuneConfig, LoRAConfig, ModelConfig, TrainConfig
from omnigpt.errors import OmnigptError
from omnigpt.finetune import finetune
from omnigpt.load import load_model
from omnigpt.lora import adapter_state, add_lora, lora_layers, merge_lora
from omnigpt.model import GPT
from tests.conftest import QUICK, single_and_two_process_runs, tiny_model


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
