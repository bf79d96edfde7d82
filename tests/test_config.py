"""Configs: checked when built, refused with their unknown keys, and the same from Python and CLI."""

import dataclasses

import pytest

from omnigpt.cli import build_parser
from omnigpt.config import (
    DEFAULT_MAX_STEPS,
    UNLIMITED_STEPS,
    FinetuneConfig,
    LoRAConfig,
    ModelConfig,
    TrainConfig,
)
from omnigpt.errors import OmnigptError


@pytest.mark.parametrize(
    "field,value,problem",
    [
        ("batch_size", 0, "batch_size (--batch-size) must be at least 1"),
        ("grad_accum", 0, "grad_accum (--grad-accum) must be at least 1"),
        ("lr", 0.0, "lr (--lr) must be positive"),
        ("max_seconds", -5.0, "max_seconds (--max-seconds) must be positive"),
        ("min_lr_ratio", 1.5, "min_lr_ratio (--min-lr-ratio) must be between 0 and 1"),
        ("weight_decay", -0.1, "weight_decay (--weight-decay) must not be negative"),
        ("precision", "fp16", "precision (--precision) must be auto, fp32 or bf16"),
        ("optimizer", "sgd", "optimizer (--optimizer) must be adamw or muon"),
    ],
)
def test_a_bad_training_setting_is_refused_by_name(field, value, problem):
    with pytest.raises(OmnigptError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_the_step_budget_follows_the_time_budget():
    assert TrainConfig().max_steps == DEFAULT_MAX_STEPS
    assert TrainConfig(max_seconds=60).max_steps == UNLIMITED_STEPS
    assert TrainConfig(max_seconds=60, max_steps=10).max_steps == 10


def test_saved_configs_with_unknown_keys_are_refused():
    d = TrainConfig().to_dict()
    assert TrainConfig.from_dict(d) == TrainConfig()
    with pytest.raises(OmnigptError, match="unknown training config keys: learning_rate"):
        TrainConfig.from_dict({**d, "learning_rate": 1.0})
    ft = FinetuneConfig(method="lora", lora=LoRAConfig(rank=4)).to_dict()
    assert FinetuneConfig.from_dict(ft).lora.rank == 4
    with pytest.raises(OmnigptError, match="unknown LoRA config keys: r"):
        FinetuneConfig.from_dict({**ft, "lora": {**ft["lora"], "r": 4}})
    with pytest.raises(OmnigptError, match="unknown model config keys: layers"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "layers": 2})


def test_training_flags_are_the_config_fields_with_the_python_defaults():
    from omnigpt.cli import _from_flags

    train = build_parser().parse_args(["train"])
    finetune = build_parser().parse_args(["finetune", "--model", "m", "--data", "d.jsonl"])
    # every TrainConfig field a user sets has a flag on both commands
    for f in dataclasses.fields(TrainConfig):
        assert f.name in vars(train) and f.name in vars(finetune), f.name
    # and with no flags given, the CLI trains exactly as the Python API does
    assert _from_flags(TrainConfig, train) == TrainConfig()
    assert _from_flags(TrainConfig, finetune) == TrainConfig.finetuning()
    lora = _from_flags(LoRAConfig, finetune, "lora_")
    assert _from_flags(FinetuneConfig, finetune, lora=lora) == FinetuneConfig()
    given = build_parser().parse_args(
        ["train", "--lr-scale", "vision=0.1,image_proj=2", "--max-seconds", "30", "--compile"]
    )
    cfg = _from_flags(TrainConfig, given)
    assert cfg.lr_scale == {"vision": 0.1, "image_proj": 2.0}
    assert cfg.max_steps == UNLIMITED_STEPS and cfg.compile
    ft = build_parser().parse_args(
        [
            "finetune",
            "--model",
            "m",
            "--data",
            "d",
            "--method",
            "partial",
            "--trainable",
            "h.1,ln_f",
        ]
    )
    assert _from_flags(FinetuneConfig, ft, lora=LoRAConfig()).trainable == ("h.1", "ln_f")


def test_sampling_flags_are_the_generation_options():
    from omnigpt.cli import _from_flags
    from omnigpt.config import GenerationOptions

    caption = build_parser().parse_args(["caption", "--model", "m", "x.png"])
    assert _from_flags(GenerationOptions, caption) == GenerationOptions(
        max_new_tokens=200, temperature=0.0
    )
    generate = build_parser().parse_args(
        ["generate", "--model", "m", "--top-k", "5", "--seed", "3"]
    )
    opts = _from_flags(GenerationOptions, generate)
    assert (opts.top_k, opts.seed, opts.temperature, opts.num_samples) == (5, 3, 0.8, 1)
