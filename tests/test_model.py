import pytest
import torch

from omnigpt.config import ModelConfig
from omnigpt.errors import OmnigptError
from omnigpt.generate import left_pad
from omnigpt.model import GPT
from omnigpt.tokenizer import IGNORE_INDEX
from tests.conftest import tiny_model

VARIANTS = [
    dict(pos_encoding="learned", mlp="gelu", norm="layernorm"),
    dict(pos_encoding="sinusoidal", mlp="gelu", norm="layernorm"),
    dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shapes_and_loss(variant):
    model = tiny_model(**variant)
    x = torch.randint(0, 64, (3, 10))
    logits, loss = model(x)
    assert logits.shape == (3, 10, 64) and loss is None
    y = torch.randint(0, 64, (3, 10))
    _, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 64), y.view(-1))
    torch.testing.assert_close(loss, expected)
    # a fresh model predicts close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_ignore_index_masks_positions():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[:, :4] = IGNORE_INDEX
    logits, _ = model(x)
    _, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 4:].reshape(-1, 64), x[:, 4:].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)


def test_embeddings_input_matches_token_input():
    model = tiny_model()
    x = torch.randint(0, 64, (2, 12))
    from_tokens, _ = model(x)
    from_embeddings, _ = model(embeddings=model.wte(x))
    torch.testing.assert_close(from_tokens, from_embeddings)


def test_tied_and_untied_head():
    tied = tiny_model()
    assert tied.lm_head.weight is tied.wte.weight
    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() == tied.num_params() + 64 * 32


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset("gpt2", vocab_size=50257))
    assert round(model.num_params() / 1e6) == 124
    assert model.flops_per_token() > 6 * 85e6
    assert "124" in model.describe()


def test_unknown_preset_and_bad_shape_are_clear():
    with pytest.raises(OmnigptError, match="unknown preset 'gpt5'"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(OmnigptError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    x = torch.randint(0, 64, (2, 8))
    a, _ = model(x)
    b, _ = model(x)
    torch.testing.assert_close(a, b)
    model.train()
    c, _ = model(x)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_recomputation(variant):
    model = tiny_model(**variant)
    x = torch.randint(0, 64, (2, 20))
    full, _ = model(x)
    caches = model.make_caches(2, 20)
    pieces = [model(x[:, :7], caches=caches)[0]]  # prefill
    pieces.append(model(x[:, 7:12], caches=caches, start_pos=7)[0])  # a chunk
    for t in range(12, 20):  # token by token
        pieces.append(model(x[:, t : t + 1], caches=caches, start_pos=t)[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_matches_each_prompt_alone(variant):
    model = tiny_model(**variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1, 2, 3, 4, 5]]
    tokens, pads = left_pad(prompts)
    T = tokens.size(1)
    key_valid = torch.arange(T)[None] >= pads[:, None]
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & key_valid[:, None, None, :]
    mask |= torch.eye(T, dtype=torch.bool)
    positions = (torch.arange(T)[None] - pads[:, None]).clamp(min=0)
    batched, _ = model(tokens, positions=positions, attn_mask=mask)
    for row, prompt in enumerate(prompts):
        alone, _ = model(torch.tensor([prompt]))
        torch.testing.assert_close(batched[row, T - len(prompt) :], alone[0], atol=1e-5, rtol=1e-5)


def test_context_overflow_raises():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_without_init_loads_like_a_built_one(variant):
    ref = tiny_model(**variant)
    empty = GPT.without_init(ref.config)
    assert empty.lm_head.weight is empty.wte.weight  # still tied
    empty.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(empty.eval()(x)[0], ref(x)[0])
