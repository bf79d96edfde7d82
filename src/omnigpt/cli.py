"""The `omnigpt` command line: argument parsing only; each subcommand calls one library function.

    omnigpt prepare corpus/ --out data/mine --tokenizer bpe:4096
    omnigpt train --data data/mine --out runs/mine --preset micro --max-seconds 600
    omnigpt generate --model runs/mine "def "
    omnigpt make-data shapes --out data/shapes -n 4000
    omnigpt train --data data/shapes/shapes.jsonl --vision small --out runs/shapes
    omnigpt caption --model runs/shapes picture.png

Problems a user can fix are printed as one `omnigpt: error: ...` line with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omnigpt.config import PRESETS, UNLIMITED_STEPS, ModelConfig, TrainConfig
from omnigpt.errors import OmnigptError
from omnigpt.synthetic import CAPTION_PROMPT, TRANSCRIBE_PROMPT

if TYPE_CHECKING:
    from omnigpt.generate import GenerationOptions

BUILTIN_DATA = Path("data/python-stdlib")

BUILTIN_TOKENIZER = "bpe:4096"


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", help="text files, folders (searched recursively) or .jsonl files"
    )
    p.add_argument(
        "--out", required=True, help="folder to write train.bin, val.bin, tokenizer.json, meta.json"
    )
    p.add_argument(
        "--tokenizer",
        default=BUILTIN_TOKENIZER,
        help="bpe:VOCAB_SIZE to train byte-level BPE, char for characters, or a tokenizer file/folder",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of tokens held out for validation"
    )
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl lines")
    p.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="skip unreadable or non-UTF-8 files instead of stopping",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the document shuffle before the split"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "--data",
        help="folder made by `omnigpt prepare` (default: the Python standard library, "
        f"prepared into {BUILTIN_DATA} on first use), or a JSONL file of examples, with images "
        "or audio or neither, to train a model on from nothing",
    )
    p.add_argument(
        "--out", help="run folder for checkpoints and logs (default: runs/run-DATE-TIME)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--init-from", help="start from this checkpoint's weights instead of random ones"
    )
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="micro", help=f"model shape: {', '.join(PRESETS)}")
    g.add_argument(
        "--n-layer", type=int, help="number of Transformer blocks (overrides the preset)"
    )
    g.add_argument("--n-head", type=int, help="attention heads per block (overrides the preset)")
    g.add_argument("--n-embd", type=int, help="model width (overrides the preset)")
    g.add_argument("--block-size", type=int, help="context length in tokens (overrides the preset)")
    g.add_argument(
        "--pos-encoding", choices=["learned", "sinusoidal", "rope"], help="positional encoding"
    )
    g.add_argument("--mlp", choices=["gelu", "swiglu"], help="feed-forward kind")
    g.add_argument("--norm", choices=["layernorm", "rmsnorm"], help="normalisation kind")
    g.add_argument("--dropout", type=float, help="dropout probability (default 0)")
    g.add_argument("--untie", action="store_true", help="give the LM head its own weights")
    g = p.add_argument_group("training on JSONL examples (--data FILE.jsonl)")
    g.add_argument(
        "--tokenizer",
        default="char",
        help="char, or bpe:VOCAB_SIZE, trained on the examples' text",
    )
    _encoder_args(g)
    g.add_argument("--pack", action="store_true", help="pack several examples per row")
    _optimisation_args(p, d)


def _encoder_args(g: argparse._ArgumentGroup) -> None:
    from omnigpt.config import ENCODER_PRESETS

    presets = ", ".join(ENCODER_PRESETS)
    g.add_argument(
        "--vision",
        metavar="SPEC",
        help=f"attach a new image encoder: {presets}, optionally with overrides "
        "(small,image_size=96,patch_size=8)",
    )
    g.add_argument(
        "--audio",
        metavar="SPEC",
        help=f"attach a new audio encoder: {presets}, optionally with overrides "
        "(small,sample_rate=8000,n_fft=200,hop_length=80)",
    )


def _optimisation_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per process"
    )
    g.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step"
    )
    g.add_argument(
        "--max-steps",
        type=int,
        help=f"stop after this many optimizer steps (default {d.max_steps}; none with --max-seconds)",
    )
    g.add_argument(
        "--max-seconds",
        type=float,
        help="stop after this much training time (the LR schedule fits it)",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "muon"],
        default=d.optimizer,
        help="adamw, or muon (Muon for weight matrices, AdamW for the rest)",
    )
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW parameters)")
    g.add_argument(
        "--muon-lr", type=float, default=d.muon_lr, help="peak learning rate of Muon's matrices"
    )
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="final LR as a fraction of the peak",
    )
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay"
    )
    g.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="clip gradient norm (0: off)"
    )
    g.add_argument(
        "--eval-interval",
        type=int,
        default=d.eval_interval,
        help="steps between evaluations and checkpoints",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="val batches per evaluation (0: all)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=d.log_interval,
        help="steps between metrics.jsonl records",
    )
    g.add_argument(
        "--early-stop-patience",
        type=int,
        default=d.early_stop_patience,
        help="stop after N evaluations without improvement (0: never)",
    )
    g.add_argument(
        "--seed", type=int, default=d.seed, help="random seed (data order, initialisation)"
    )
    g.add_argument(
        "--lr-scale",
        default="",
        help="per-part learning rates: name-prefix=factor pairs, e.g. vision=0.1,image_proj=2",
    )
    g.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast where bf16 is native (CUDA; CPUs with AMX or AVX-512 BF16), "
        "fp32 elsewhere; bf16 on other CPUs works but is emulated and slow",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


FINETUNE_DEFAULTS = TrainConfig(
    lr=3e-4, warmup_steps=20, eval_interval=100, eval_batches=0, early_stop_patience=5
)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    from omnigpt.lora import DEFAULT_TARGETS, LoRAConfig

    lora = LoRAConfig()
    p.add_argument(
        "--model",
        required=True,
        help="model to adapt: omnigpt run or checkpoint, Hugging Face GPT-2 folder, or cached Hub name",
    )
    p.add_argument(
        "--data",
        required=True,
        help='JSONL of {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]} lines',
    )
    p.add_argument(
        "--val-data",
        help="JSONL of validation examples (default: hold out --val-fraction of --data)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of --data held out for validation"
    )
    p.add_argument(
        "--out", help="run folder for checkpoints and logs (default: runs/finetune-DATE-TIME)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    g = p.add_argument_group("what to train")
    g.add_argument(
        "--method",
        choices=["full", "partial", "lora"],
        default="full",
        help="full: every weight; partial: only --trainable / --last-blocks; lora: low-rank adapters",
    )
    g.add_argument(
        "--trainable",
        default="",
        help="partial: comma-separated parameter names, prefixes or globs (e.g. h.5,ln_f,lm_head)",
    )
    g.add_argument(
        "--last-blocks", type=int, default=0, help="partial: train the last N Transformer blocks"
    )
    g.add_argument("--lora-rank", type=int, default=lora.rank, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=lora.alpha, help="LoRA scale numerator")
    g.add_argument("--lora-dropout", type=float, default=lora.dropout, help="LoRA input dropout")
    g.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated Linear layer names to adapt (c_attn, c_proj, c_fc, attn.c_proj, ...)",
    )
    g = p.add_argument_group("examples")
    g.add_argument(
        "--pack",
        action="store_true",
        help="pack several examples per row (no attention between them) instead of padding",
    )
    g.add_argument(
        "--too-long",
        choices=["truncate", "drop"],
        default="truncate",
        help="examples longer than the context: cut their end, or leave them out",
    )
    g.add_argument(
        "--epochs", type=float, help="passes over the training examples (sets --max-steps)"
    )
    g.add_argument(
        "--skip-bad-media",
        action="store_true",
        help="leave out examples whose image or audio file is missing or unreadable (default: stop)",
    )
    g = p.add_argument_group(
        "images and audio",
        "New encoders start untrained: align them first with the decoder frozen "
        "(--method partial --trainable vision,image_proj), then tune on instructions.",
    )
    _encoder_args(g)
    _optimisation_args(p, FINETUNE_DEFAULTS)


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", help="prompts; none (or -) reads one prompt from stdin")
    p.add_argument(
        "--model",
        required=True,
        help="run or checkpoint folder, Hugging Face GPT-2 folder, or Hub name in the local HF cache",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer file to use instead of the checkpoint's (must match it)"
    )
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument(
        "--stop", action="append", default=[], help="stop a completion at this string (repeatable)"
    )
    p.add_argument(
        "--no-eot-stop", action="store_true", help="keep generating past the end-of-text token"
    )
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument(
        "--no-token-healing",
        action="store_true",
        help="keep the prompt's last token as typed (by default it is re-chosen, so 'def ' works)",
    )
    _sampling_args(p, temperature=0.8)


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200, help="longest answer, in tokens")
    p.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help="sampling temperature (0: greedy)",
    )
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p",
        type=float,
        help="sample among the most likely tokens holding this much probability",
    )
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens"
    )
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="fine-tuned chat model: run or checkpoint folder")
    p.add_argument("--system", help="system prompt that starts the conversation")
    _sampling_args(p, temperature=0.7)


def _media_args(p: argparse.ArgumentParser, kind: str, prompt: str | None) -> None:
    p.add_argument(
        "--model", required=True, help=f"run or checkpoint folder of a model with {kind}"
    )
    p.add_argument("files", nargs="+", metavar=kind.upper(), help=f"{kind} files")
    if prompt is None:  # `ask`: the question is the last argument
        p.add_argument("question", help="the question about the image")
    else:
        p.add_argument(
            "--prompt", default=prompt, help=f"the instruction given with each file ({prompt!r})"
        )
    if kind == "audio":
        _ctc_arg(p)
    _sampling_args(p, temperature=0.0)


def _ctc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ctc-weight",
        type=float,
        default=0.0,
        help="joint CTC/attention decoding for a model trained with ctc=WEIGHT in --audio: the CTC "
        "head's share of each token's score, 0 to 1 (0.5 is a good start; default 0: the decoder alone)",
    )


def _make_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "kinds",
        nargs="+",
        choices=["shapes", "keypad"],
        help="shapes: images of coloured shapes with captions and questions; keypad: telephone "
        "key tones with their digits; both: also all.jsonl with every example, shuffled",
    )
    p.add_argument("--out", required=True, help="folder for the JSONL file and the media files")
    p.add_argument("-n", type=int, default=1000, help="number of images or clips")
    p.add_argument("--seed", type=int, default=0, help="random seed (another seed: other data)")
    p.add_argument(
        "--no-questions", action="store_true", help="shapes: captions only, no questions"
    )
    p.add_argument(
        "--max-shapes", type=int, choices=[1, 2, 3], default=3, help="shapes: at most N per image"
    )
    p.add_argument(
        "--max-digits",
        type=int,
        choices=range(1, 7),
        default=6,
        metavar="{1..6}",
        help="keypad: at most N key presses per clip",
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from omnigpt.metrics import METRICS

    p.add_argument(
        "--model", required=True, help="run or checkpoint folder, or Hugging Face folder"
    )
    p.add_argument("--data", required=True, help="JSONL examples, as for `omnigpt finetune`")
    p.add_argument(
        "--metric",
        action="append",
        choices=METRICS,
        help="metric to report (repeatable; default: perplexity)",
    )
    p.add_argument(
        "--out",
        help="folder for summary.json and predictions.jsonl (default: eval-DATA_NAME in the run folder)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=int, default=32, help="examples generated together")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="autocast for perplexity (as in training)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _ctc_arg(p)
    _sampling_args(p, temperature=0.0)


def _convert_args(p: argparse.ArgumentParser) -> None:
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument(
        "--from-hf",
        metavar="DIR_OR_NAME",
        help="a Hugging Face GPT-2 folder or cached Hub name to convert into an omnigpt checkpoint",
    )
    way.add_argument(
        "--to-hf",
        metavar="RUN",
        help="an omnigpt run or checkpoint to export in GPT-2 format (LoRA adapters are merged)",
    )
    way.add_argument(
        "--merge-lora",
        metavar="RUN",
        help="a LoRA fine-tuning run or checkpoint: write base + adapters as one plain checkpoint",
    )
    p.add_argument(
        "--out", required=True, help="folder to write (must not hold a checkpoint already)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnigpt", description="Build, train and run GPT-style language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _prepare_args(
        sub.add_parser(
            "prepare",
            help="tokenize a text corpus into train/val token files",
            description="Tokenize a text corpus into train/val token files.",
        )
    )
    _train_args(
        sub.add_parser(
            "train",
            help="pretrain a GPT on prepared data (default: Python stdlib)",
            description="Pretrain a GPT by next-token prediction.",
        )
    )
    _finetune_args(
        sub.add_parser(
            "finetune",
            help="fine-tune a model on prompt/completion or chat examples",
            description="Supervised fine-tuning: fully, only some parts, or with LoRA adapters.",
        )
    )
    _chat_args(
        sub.add_parser(
            "chat",
            help="chat with a fine-tuned model in the terminal",
            description="Interactive multi-turn chat, streaming the replies. "
            "Type /reset to start over, /exit (or Ctrl-D) to leave.",
        )
    )
    _evaluate_args(
        sub.add_parser(
            "evaluate",
            help="score a model on JSONL examples (perplexity, BLEU, chrF, ROUGE, EM, F1, WER)",
            description="Generate an answer per example and score it; writes a per-example "
            "predictions.jsonl beside summary.json.",
        )
    )
    _generate_args(
        sub.add_parser(
            "generate",
            help="generate text from a trained model",
            description="Generate text from a trained model, streaming to the terminal.",
        )
    )
    _media_args(
        sub.add_parser(
            "caption",
            help="describe images with a model that sees",
            description="Write a caption for each image (greedy by default).",
        ),
        "image",
        CAPTION_PROMPT,
    )
    _media_args(
        sub.add_parser(
            "ask",
            help="answer a question about an image",
            description="Answer a question about each image (greedy by default).",
        ),
        "image",
        None,
    )
    _media_args(
        sub.add_parser(
            "transcribe",
            help="transcribe audio with a model that hears",
            description="Transcribe each audio file: WAV, FLAC or OGG at any sample rate.",
        ),
        "audio",
        TRANSCRIBE_PROMPT,
    )
    _make_data_args(
        sub.add_parser(
            "make-data",
            help="write the built-in image or audio data set (seeded, no download)",
            description="Write a built-in data set as JSONL plus PNG or WAV files.",
        )
    )
    _convert_args(
        sub.add_parser(
            "convert",
            help="convert to or from the Hugging Face GPT-2 format",
            description="Convert checkpoints to or from the Hugging Face GPT-2 format.",
        )
    )
    return parser


def _version() -> str:
    from omnigpt import __version__

    return __version__


# -- commands -------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> None:
    from omnigpt.data import prepare

    out = Path(args.out)
    if out.exists() and not (out / "meta.json").is_file():
        raise OmnigptError(f"{out} exists and is not a prepared data folder; choose another --out")
    summary = prepare(
        args.inputs,
        out,
        args.tokenizer,
        args.val_fraction,
        args.text_field,
        args.skip_bad_files,
        args.seed,
    )
    print(summary)


def cmd_train(args: argparse.Namespace) -> None:
    from omnigpt.train import pretrain

    if args.resume and not args.out:
        raise OmnigptError("--resume needs --out RUN_FOLDER")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    if args.data and args.data.endswith(".jsonl") or _examples_run(out, args.resume):
        return _train_on_examples(args, out)
    if args.vision or args.audio:
        raise OmnigptError("--vision / --audio train on examples: give --data FILE.jsonl")
    if args.resume:
        data = Path(args.data or "")  # the run folder's config names its data
    else:
        data = Path(args.data) if args.data else _builtin_data()
        if not (data / "train.bin").is_file():
            raise OmnigptError(
                f"{data}: not a prepared data folder (run `omnigpt prepare ... --out {data}`)"
            )
    result = pretrain(
        data,
        out,
        _model_config(args),
        _train_config(args),
        resume=args.resume,
        init_from=args.init_from,
        progress=not args.no_progress,
        resume_overrides=_budgets(args),
    )
    _report(result, out)


def _model_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {
        k: getattr(args, k)
        for k in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "pos_encoding",
            "mlp",
            "norm",
            "dropout",
        )
        if getattr(args, k) is not None
    }
    if args.untie:
        overrides["tie_embeddings"] = False
    return ModelConfig.from_preset(args.preset, **overrides)


def _budgets(args: argparse.Namespace) -> dict:
    """The step and time budgets given on the command line (they override a resumed run's)."""
    return {
        k: getattr(args, k) for k in ("max_steps", "max_seconds") if getattr(args, k) is not None
    }


def _examples_run(out: Path, resume: bool) -> bool:
    """Whether --resume names a run that trains on JSONL examples (it has an init/ checkpoint)."""
    return resume and (out / "init").is_dir()


def _train_on_examples(args: argparse.Namespace, out: Path) -> None:
    """A new model (encoders as asked, tokenizer trained on the examples' text) saved in out/init,
    then trained on every weight by `finetune()`, on the same loop and run folder as `train`."""
    from omnigpt.chat import read_records
    from omnigpt.checkpoint import save_checkpoint
    from omnigpt.finetune import FinetuneConfig, finetune, new_model

    if args.init_from:
        raise OmnigptError(
            "--init-from: to start JSONL training from a model, use `omnigpt finetune`"
        )
    if not args.resume:
        if (out / "init").exists():
            raise OmnigptError(f"{out} already holds a run; pass --resume, or choose another --out")
        import torch

        records = read_records(args.data)
        torch.manual_seed(args.seed)
        model, tokenizer = new_model(
            records, _model_config(args), args.tokenizer, args.vision, args.audio
        )
        save_checkpoint(out / "init", model, tokenizer)
        print(f"new model in {out / 'init'} ({tokenizer.vocab_size} tokens: {args.tokenizer})")
    result = finetune(
        out / "init",
        args.data,
        out,
        FinetuneConfig(method="full", pack=args.pack),
        _train_config(args),
        resume=args.resume,
        progress=not args.no_progress,
        resume_overrides=_budgets(args),
    )
    _report(result, out)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.max_steps
        or (UNLIMITED_STEPS if args.max_seconds else TrainConfig.max_steps),
        max_seconds=args.max_seconds,
        optimizer=args.optimizer,
        lr=args.lr,
        muon_lr=args.muon_lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        log_interval=args.log_interval,
        seed=args.seed,
        compile=args.compile,
        precision=args.precision,
        device=args.device,
        early_stop_patience=args.early_stop_patience,
        lr_scale=_lr_scale(args.lr_scale),
    )


def _lr_scale(text: str) -> dict[str, float]:
    scales = {}
    for item in filter(None, text.split(",")):
        name, _, factor = item.partition("=")
        try:
            scales[name.strip()] = float(factor)
        except ValueError:
            raise OmnigptError(f"--lr-scale: {item!r} is not NAME=FACTOR") from None
    return scales


def _report(result, out: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result}")
        print(
            f"run folder: {out}  (checkpoints: {out}/best, {out}/latest; loss curve: {out}/loss.png; "
            f"metrics: {out}/metrics.jsonl)"
        )


def cmd_finetune(args: argparse.Namespace) -> None:
    from omnigpt.finetune import FinetuneConfig, finetune
    from omnigpt.lora import LoRAConfig

    if args.resume and not args.out:
        raise OmnigptError("--resume needs --out RUN_FOLDER")
    out = Path(args.out) if args.out else Path("runs") / time.strftime("finetune-%Y%m%d-%H%M%S")
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    ft_cfg = FinetuneConfig(
        method=args.method,
        trainable=tuple(t for t in args.trainable.split(",") if t),
        last_blocks=args.last_blocks,
        lora=LoRAConfig(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            targets=tuple(t for t in args.lora_targets.split(",") if t),
        ),
        pack=args.pack,
        too_long=args.too_long,
        val_fraction=args.val_fraction,
        epochs=args.epochs,
        skip_bad_media=args.skip_bad_media,
        vision=args.vision,
        audio=args.audio,
    )
    result = finetune(
        args.model,
        args.data,
        out,
        ft_cfg,
        _train_config(args),
        val_data=args.val_data,
        resume=args.resume,
        progress=not args.no_progress,
        resume_overrides=_budgets(args),
    )
    _report(result, out)


def _stop_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (a cluster pre-empting the job) saves latest/ and stops, as Ctrl-C does."""
    raise KeyboardInterrupt


def _builtin_data() -> Path:
    """The Python standard library, tokenized once into data/python-stdlib."""
    if (BUILTIN_DATA / "train.bin").is_file():
        return BUILTIN_DATA
    from omnigpt.data import prepare, stdlib_corpus

    files = stdlib_corpus()
    print(
        f"no --data given: preparing the built-in corpus ({len(files):,} Python standard library files)"
    )
    print(prepare(files, BUILTIN_DATA, BUILTIN_TOKENIZER))
    return BUILTIN_DATA


def cmd_generate(args: argparse.Namespace) -> None:
    from omnigpt.generate import generate_text
    from omnigpt.hf import load_model
    from omnigpt.train import pick_device

    prompts = [p for p in args.prompts if p != "-"]
    if args.prompt_file:
        try:
            prompts += [
                line
                for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
                if line
            ]
        except (OSError, UnicodeDecodeError) as e:
            raise OmnigptError(f"{args.prompt_file}: cannot read prompts ({e})") from None
    if not prompts:
        if sys.stdin.isatty():
            raise OmnigptError(
                "no prompt: give one as an argument, with --prompt-file, or on stdin"
            )
        prompts = [sys.stdin.read()]
    opts = _generation_options(
        args,
        stop_at_eot=not args.no_eot_stop,
        stop_strings=tuple(args.stop),
        num_samples=args.num_samples,
        token_healing=not args.no_token_healing,
    )
    model, tokenizer = load_model(args.model, pick_device(args.device), args.tokenizer)
    streaming = len(prompts) * opts.num_samples == 1
    if streaming:
        sys.stdout.write(prompts[0])

    def on_text(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    texts = generate_text(model, tokenizer, prompts, opts, on_text if streaming else None)
    if streaming:
        sys.stdout.write("\n")
        return
    for i, text in enumerate(texts):
        prompt = prompts[i // opts.num_samples]
        print(f"--- prompt {i // opts.num_samples + 1}, sample {i % opts.num_samples + 1}")
        print(prompt + text)


def _generation_options(args: argparse.Namespace, **extra) -> GenerationOptions:
    from omnigpt.generate import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        ctc_weight=getattr(args, "ctc_weight", 0.0),
        **extra,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from omnigpt.chat import fit_history, stop_ids
    from omnigpt.evaluate import media_prompt
    from omnigpt.generate import generate_tokens
    from omnigpt.hf import load_model
    from omnigpt.media import collate_media
    from omnigpt.tokenizer import AUDIO, IMAGE
    from omnigpt.train import pick_device

    opts = _generation_options(args, token_healing=False)
    model, tokenizer = load_model(args.model, pick_device(args.device))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    stops = stop_ids(tokenizer)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chatting with", args.model, "— /reset starts over, /exit or Ctrl-D leaves")
        if getattr(model, "vision", None) or getattr(model, "audio", None):
            print("/image PATH [text] or /audio PATH [text] puts a file in your message")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        message = {"role": "user", "content": text}
        command, _, rest = text.partition(" ")
        if command in ("/image", "/audio"):
            path, _, text = rest.strip().partition(" ")
            if not path:
                print(f"({command} needs a file path)")
                continue
            kind = command[1:]
            placeholder = IMAGE if kind == "image" else AUDIO
            message = {"role": "user", "content": placeholder + text.strip(), kind: path}
        history.append(message)
        budget = model.config.block_size - min(opts.max_new_tokens, model.config.block_size // 2)
        history, dropped = fit_history(tokenizer, system, history, budget)
        if dropped and interactive:
            print(f"(dropped the {dropped} oldest message(s) to stay within the context)")
        conversation = system + history
        record = {"messages": [*conversation, {"role": "assistant", "content": ""}]}
        for kind in ("image", "audio"):
            record[kind] = [m[kind] for m in conversation if kind in m]
        try:
            prompt, media = media_prompt(model, tokenizer, record)
        except OmnigptError as e:
            print(f"({e})")
            history.pop()
            continue
        if len(prompt) >= model.config.block_size:
            print(
                f"(that message is too long for the model's context of {model.config.block_size} tokens)"
            )
            history.pop()
            continue
        stream = tokenizer.stream()
        sys.stdout.write("assistant> " if interactive else "")

        def on_step(ids: list[int], stream=stream) -> None:
            if ids[0] not in stops:
                sys.stdout.write(stream.push(ids[0]))
                sys.stdout.flush()

        device = model.wte.weight.device
        inputs = {k: v.to(device) for k, v in collate_media([media]).items()} if media else {}
        new = generate_tokens(
            model, [prompt], opts, stops, tokenizer.vocab_size, on_step, prefill_inputs=inputs
        )
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": tokenizer.decode(new[0]).strip()})


def cmd_media(args: argparse.Namespace) -> None:
    """caption / ask / transcribe: one answer per file, printed as it comes."""
    from omnigpt.evaluate import generate_answers
    from omnigpt.hf import load_model
    from omnigpt.train import pick_device

    kind = "audio" if args.command == "transcribe" else "image"
    prompt = args.question if args.command == "ask" else args.prompt
    model, tokenizer = load_model(args.model, pick_device(args.device))
    opts = _generation_options(args, token_healing=False)
    for path in args.files:
        record = {kind: str(Path(path).resolve()), "prompt": prompt}
        [answer] = generate_answers(model, tokenizer, [record], opts, progress=False)
        print(f"{path}: {answer}" if len(args.files) > 1 else answer, flush=True)


def cmd_make_data(args: argparse.Namespace) -> None:
    import random

    from omnigpt.synthetic import write_keypad, write_shapes

    lines = []
    for kind in dict.fromkeys(args.kinds):
        if kind == "shapes":
            path = write_shapes(
                args.out, args.n, args.seed, not args.no_questions, (1, args.max_shapes)
            )
        else:
            path = write_keypad(args.out, args.n, args.seed, (1, args.max_digits))
        these = path.read_text(encoding="utf-8").splitlines(keepends=True)
        print(f"{len(these):,} example{'s' * (len(these) != 1)} in {path}")
        lines += these
    if len(set(args.kinds)) > 1:
        random.Random(args.seed).shuffle(lines)
        path = Path(args.out) / "all.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        print(f"{len(lines):,} examples in {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from omnigpt.chat import read_records
    from omnigpt.evaluate import evaluate
    from omnigpt.hf import load_model
    from omnigpt.train import pick_device

    records = read_records(args.data)
    if args.limit:
        records = records[: args.limit]
    metrics = args.metric or ["perplexity"]
    model, tokenizer = load_model(args.model, pick_device(args.device))
    out = args.out
    if out is None:
        base = Path(args.model) if Path(args.model).is_dir() else Path(".")
        out = base / f"eval-{Path(args.data).stem}"
    summary = evaluate(
        model,
        tokenizer,
        records,
        metrics,
        _generation_options(args, token_healing=False),
        out,
        args.batch_size,
        args.precision,
        progress=not args.no_progress,
        base_dir=Path(args.data).parent,
    )
    for name, value in summary["metrics"].items():
        print(f"{name}: {value:.4f}")
    print(f"{summary['examples']} examples in {summary['seconds']:.1f}s; written to {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from omnigpt.hf import export_hf, import_hf, load_model

    out = Path(args.out)
    if args.from_hf:
        import_hf(args.from_hf, out)
        print(
            f"converted {args.from_hf} → {out} (an omnigpt checkpoint: generate, fine-tune or --init-from it)"
        )
        return
    if (out / "model.safetensors").exists():
        raise OmnigptError(f"{out} already holds a model; choose another --out")
    if args.merge_lora:
        from omnigpt.checkpoint import save_checkpoint
        from omnigpt.lora import merge_lora

        model, tokenizer = load_model(args.merge_lora)
        if not merge_lora(model):
            raise OmnigptError(f"{args.merge_lora}: no LoRA adapters to merge")
        save_checkpoint(out, model, tokenizer)
        print(f"merged {args.merge_lora} → {out} (a plain omnigpt checkpoint)")
        return
    model, tokenizer = load_model(args.to_hf)
    export_hf(model, tokenizer, out)
    print(
        f"exported {args.to_hf} → {out} (GPT-2 format: transformers.AutoModelForCausalLM.from_pretrained)"
    )


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "finetune": cmd_finetune,
    "chat": cmd_chat,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
    "convert": cmd_convert,
    "caption": cmd_media,
    "ask": cmd_media,
    "transcribe": cmd_media,
    "make-data": cmd_make_data,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except OmnigptError as e:
        print(f"omnigpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nomnigpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
