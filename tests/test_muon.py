"""Muon: the same update and state as torch.optim.Muon, orthogonalising in bf16 or fp32 as the
hardware prefers."""

import pytest
import torch

from omnigpt.muon import Muon, orthogonalise

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", [(64, 192), (256, 64), (3, 48, 48)])
def test_orthogonalisation_in_fp32_matches_bf16_within_bf16_tolerance(shape):
    g = torch.randn(shape)
    in_fp32 = orthogonalise(g, torch.float32)
    in_bf16 = orthogonalise(g, torch.bfloat16).float()
    assert in_fp32.dtype == torch.float32 and in_fp32.shape == g.shape
    scale = in_fp32.abs().max()
    assert (in_fp32 - in_bf16).abs().max() < 0.05 * scale  # bf16 keeps 8 bits of mantissa
    assert (
        torch.nn.functional.cosine_similarity(in_fp32.flatten(), in_bf16.flatten(), dim=0) > 0.999
    )
    # Newton–Schulz brings every singular value near 1 (the quintic leaves them in ≈ 0.5–1.5)
    s = torch.linalg.svdvals(in_fp32)
    assert s.min() > 0.3 and s.max() < 1.6


def _muon_steps(optimizer_cls, params0, grads, **kwargs) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = optimizer_cls(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def test_muon_in_bf16_is_torch_muon_and_fp32_agrees_within_bf16_tolerance():
    shapes = [(32, 96), (32, 32), (128, 32), (32, 32)]  # same-shaped matrices are batched
    params0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    reference = _muon_steps(torch.optim.Muon, params0, grads)
    bf16 = _muon_steps(Muon, params0, grads, ns_dtype=torch.bfloat16)
    fp32 = _muon_steps(Muon, params0, grads, ns_dtype=torch.float32)
    for p0, ref, a, b in zip(params0, reference, bf16, fp32, strict=True):
        torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)  # the same update as torch's Muon
        moved = (ref - p0).abs().max()
        assert moved > 0.01
        assert (b - ref).abs().max() < 0.05 * moved  # fp32 orthogonalisation: within bf16 error


def test_muon_picks_its_dtype_by_the_hardware(fake_cpu):
    fake_cpu("AVX2")
    opt = Muon([torch.nn.Parameter(torch.randn(8, 8))])
    assert opt.orthogonalisation_dtype(CPU) == torch.float32
    fake_cpu("AVX512", amx=True)
    assert opt.orthogonalisation_dtype(CPU) == torch.bfloat16


def test_muon_state_loads_into_torch_muon_and_back():
    p = torch.nn.Parameter(torch.randn(16, 8))
    ours = Muon([p], lr=0.02)
    p.grad = torch.randn(16, 8)
    ours.step()
    theirs = torch.optim.Muon([torch.nn.Parameter(p.detach().clone())], lr=0.02)
    theirs.load_state_dict(ours.state_dict())
    again = Muon([torch.nn.Parameter(p.detach().clone())], lr=0.02)
    again.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(
        again.state[again.param_groups[0]["params"][0]]["momentum_buffer"],
        ours.state[p]["momentum_buffer"],
    )


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D parameters only"):
        Muon([torch.nn.Parameter(torch.randn(8))])
