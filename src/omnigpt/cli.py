"""The `omnigpt` command line: each subcommand parses its arguments and calls the library.

    omnigpt prepare corpus/ --out data/mine --tokenizer bpe:4096
    omnigpt train --data data/mine --out runs/mine --preset micro --max-seconds 600
    omnigpt generate --model runs/mine "def "
    omnigpt make-data shapes --out data/shapes -n 4000
    omnigpt train --data data/shapes/shapes.jsonl --vision small --out runs/shapes
    omnigpt caption --model runs/shapes picture.png
    omnigpt make-data shapes --draw --out data/draw -n 4000
    omnigpt train --data data/draw/shapes.jsonl --out runs/draw --image-size 32 --patch 4 --palette 512
    omnigpt imagine --model runs/draw "a red circle" -n 8 --cfg 3 --out drawn/

Problems a user can fix are printed as one `omnigpt: error: ...` line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from omnigpt.config import (
    FINETUNING_DEFAULTS,
    PRESETS,
    FinetuneConfig,
    GenerationOptions,
    ImageTokensConfig,
    LoRAConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
)
from omnigpt.errors import OmnigptError
from omnigpt.quantize import QUANTIZATIONS
from omnigpt.synthetic import CAPTION_PROMPT, TRANSCRIBE_PROMPT

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
    g = p.add_argument_group(
        "images", "Image files among the inputs become image tokens, for next-pixel pretraining."
    )
    _config_flags(g, ImageTokensConfig)


def _config_flags(
    group: argparse._ActionsContainer,
    cls: type,
    only: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
    prefix: str = "",
    overriding: str | None = None,
) -> None:
    """One flag per field of the config dataclass `cls` that carries help text (see
    `config._option`): the field's name with dashes, its type, default and help. `defaults`
    replaces some defaults; with `overriding`, every default is None and the help says what the
    flag overrides."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or (only is not None and f.name not in only):
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) in (Union, types.UnionType):  # X | None
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        text = f.metadata["help"]
        if overriding:
            text += f" (overrides the {overriding})"
        elif not (default is None or default is False or default in ((), {})):
            shown = ",".join(default) if isinstance(default, tuple) else default
            text += "" if "default" in text else f" (default: {shown})".replace("%", "%%")
        options: dict[str, Any] = {"help": text, "default": None if overriding else default}
        if kind is bool:  # --flag, or --flag / --no-flag where it is on by default
            options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif typing.get_origin(kind) is Literal:
            options["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            options["type"] = _comma_list
        else:
            options["type"] = f.metadata.get("parse", kind)
        if "metavar" in f.metadata:
            options["metavar"] = f.metadata["metavar"]
        group.add_argument("--" + (prefix + f.name).replace("_", "-"), **options)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _from_flags(cls: type, args: argparse.Namespace, prefix: str = "", **values: Any) -> Any:
    """The config `cls` from the flags `_config_flags` made for it (and `values` besides)."""
    for f in dataclasses.fields(cls):
        if hasattr(args, prefix + f.name) and f.name not in values:
            values[f.name] = getattr(args, prefix + f.name)
    return cls(**values)


MODEL_FLAGS = (
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "pos_encoding",
    "mlp",
    "norm",
    "dropout",
    "image_positions",
)
ENCODER_FLAGS = ("vision", "audio")


def _train_args(p: argparse.ArgumentParser) -> None:
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
    _config_flags(g, ModelConfig, MODEL_FLAGS, overriding="preset")
    g.add_argument("--untie", action="store_true", help="give the LM head its own weights")
    g = p.add_argument_group("training on JSONL examples (--data FILE.jsonl)")
    g.add_argument(
        "--tokenizer",
        default="char",
        help="char, or bpe:VOCAB_SIZE, trained on the examples' text",
    )
    _config_flags(g, FinetuneConfig, (*ENCODER_FLAGS, "pack"))
    g = p.add_argument_group('text→image examples ({"prompt", "image_out"} lines)')
    _config_flags(g, ImageTokensConfig)
    _config_flags(g, FinetuneConfig, ("drop_condition",))
    _config_flags(p.add_argument_group("optimisation"), TrainConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _finetune_args(p: argparse.ArgumentParser) -> None:
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
        "--out", help="run folder for checkpoints and logs (default: runs/finetune-DATE-TIME)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    g = p.add_argument_group("what to train")
    _config_flags(g, FinetuneConfig, ("method", "trainable", "last_blocks"))
    _config_flags(g, LoRAConfig, prefix="lora_")
    g = p.add_argument_group("examples")
    _config_flags(
        g,
        FinetuneConfig,
        ("pack", "too_long", "epochs", "val_fraction", "skip_bad_media", "drop_condition"),
    )
    g = p.add_argument_group(
        "images and audio",
        "New encoders start untrained: align them first with the decoder frozen "
        "(--method partial --trainable vision,image_proj), then tune on instructions.",
    )
    _config_flags(g, FinetuneConfig, ENCODER_FLAGS)
    _config_flags(p.add_argument_group("optimisation"), TrainConfig, defaults=FINETUNING_DEFAULTS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    _config_flags(p, GenerationOptions, ("num_samples",))
    p.add_argument(
        "--draft",
        metavar="RUN",
        help="speculative decoding: a small model with the same tokenizer proposes tokens that "
        "the model checks in one pass (same output distribution; greedy output unchanged)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=4,
        help="tokens the draft proposes per pass (default: 4)",
    )
    p.add_argument(
        "--no-token-healing",
        action="store_true",
        help="keep the prompt's last token as typed (by default it is re-chosen, so 'def ' works)",
    )
    _sampling_args(p, temperature=0.8)


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    defaults = {"temperature": temperature, "max_new_tokens": 200}
    _config_flags(p, GenerationOptions, SAMPLING_FLAGS, defaults)
    _device_args(p)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="int8: int8 weights, a scale per output channel (a quarter of fp32's bytes per token); "
        "bf16: bf16 weights, where bf16 is native (CUDA, AMX or AVX-512-BF16 CPUs)",
    )


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="fine-tuned chat model: run or checkpoint folder")
    p.add_argument("--system", help="system prompt that starts the conversation")
    p.add_argument(
        "--image-dir",
        default="imagined",
        help="where /imagine TEXT saves what the model draws (with the sampling flags below)",
    )
    _sampling_args(p, temperature=0.7)


def _imagine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompts", nargs="*", help='what to draw, e.g. "a red circle"; none: draw unconditionally'
    )
    p.add_argument("--model", required=True, help="run or checkpoint folder of a model that draws")
    p.add_argument("--out", required=True, help="folder for NNNN.png and sheet.png (all samples)")
    p.add_argument(
        "-n", "--num-samples", type=int, default=1, help="images per prompt (drawn together)"
    )
    p.add_argument(
        "--cfg",
        type=float,
        help="classifier-free guidance scale; 1 is none (default: 3 for a model that learned to "
        "draw without a prompt, else 1)",
    )
    p.add_argument("--complete", metavar="IMAGE", help="finish this image from its top --rows")
    p.add_argument("--rows", type=int, default=0, help="rows of codes of --complete to keep")
    p.add_argument(
        "--scale", type=int, default=8, help="sheet.png shows each image this many times larger"
    )
    _config_flags(
        p, GenerationOptions, ("temperature", "top_k", "top_p", "seed"), {"temperature": 1.0}
    )
    _device_args(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="run or checkpoint folder, Hugging Face GPT-2 folder, or Hub name in the local HF cache",
    )
    _config_flags(p, ServeConfig)
    _device_args(p)


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
    _config_flags(p, GenerationOptions, ("ctc_weight",))


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
        "--draw",
        action="store_true",
        help='shapes: also a text→image example per scene ({"prompt": caption, "image_out": PNG})',
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


# name: (what adds its arguments, one-line help, description)
SUBCOMMANDS = {
    "prepare": (
        _prepare_args,
        "tokenize a text corpus into train/val token files",
        "Tokenize a text corpus into train/val token files.",
    ),
    "train": (
        _train_args,
        "pretrain a GPT on prepared data (default: Python stdlib)",
        "Pretrain a GPT by next-token prediction.",
    ),
    "finetune": (
        _finetune_args,
        "fine-tune a model on prompt/completion or chat examples",
        "Supervised fine-tuning: fully, only some parts, or with LoRA adapters.",
    ),
    "chat": (
        _chat_args,
        "chat with a fine-tuned model in the terminal",
        "Interactive multi-turn chat, streaming the replies. "
        "Type /reset to start over, /exit (or Ctrl-D) to leave.",
    ),
    "evaluate": (
        _evaluate_args,
        "score a model on JSONL examples (perplexity, BLEU, chrF, ROUGE, EM, F1, WER)",
        "Generate an answer per example and score it; writes a per-example "
        "predictions.jsonl beside summary.json.",
    ),
    "generate": (
        _generate_args,
        "generate text from a trained model",
        "Generate text from a trained model, streaming to the terminal.",
    ),
    "caption": (
        functools.partial(_media_args, kind="image", prompt=CAPTION_PROMPT),
        "describe images with a model that sees",
        "Write a caption for each image (greedy by default).",
    ),
    "ask": (
        functools.partial(_media_args, kind="image", prompt=None),
        "answer a question about an image",
        "Answer a question about each image (greedy by default).",
    ),
    "transcribe": (
        functools.partial(_media_args, kind="audio", prompt=TRANSCRIBE_PROMPT),
        "transcribe audio with a model that hears",
        "Transcribe each audio file: WAV, FLAC or OGG at any sample rate.",
    ),
    "imagine": (
        _imagine_args,
        "draw images from text with a model that writes them",
        "Draw images from a prompt (or none), or complete an image from its top rows; writes "
        "one PNG per sample and a contact sheet of all of them.",
    ),
    "serve": (
        _serve_args,
        "serve a model over the OpenAI API, with a web chat page",
        "Serve a model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/audio/transcriptions, /v1/images/generations, /v1/models), a chat page at /, "
        "/health and /metrics. Many requests decode together (continuous batching).",
    ),
    "make-data": (
        _make_data_args,
        "write the built-in image or audio data set (seeded, no download)",
        "Write a built-in data set as JSONL plus PNG or WAV files.",
    ),
    "convert": (
        _convert_args,
        "convert to or from the Hugging Face GPT-2 format",
        "Convert checkpoints to or from the Hugging Face GPT-2 format.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnigpt", description="Build, train and run GPT-style language models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_args, help, description) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help, description=description))
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
        images=_from_flags(ImageTokensConfig, args),
    )
    print(summary)


def cmd_train(args: argparse.Namespace) -> None:
    from omnigpt.finetune import train_on_examples
    from omnigpt.train import pretrain

    out = _run_folder(args, "run")
    train_cfg = _from_flags(TrainConfig, args)
    examples_run = args.resume and (out / "init").is_dir()  # its model was built for its examples
    if examples_run or (args.data and args.data.endswith(".jsonl")):
        if args.init_from:
            raise OmnigptError(
                "--init-from: to start JSONL training from a model, use `omnigpt finetune`"
            )
        result = train_on_examples(
            args.data,
            out,
            _model_config(args),
            train_cfg,
            args.tokenizer,
            args.vision,
            args.audio,
            args.pack,
            resume=args.resume,
            progress=not args.no_progress,
            resume_overrides=_budgets(args),
            images=_from_flags(ImageTokensConfig, args),
            drop_condition=args.drop_condition,
        )
        return _report(result, out)
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
        train_cfg,
        resume=args.resume,
        init_from=args.init_from,
        progress=not args.no_progress,
        resume_overrides=_budgets(args),
    )
    _report(result, out)


def cmd_finetune(args: argparse.Namespace) -> None:
    from omnigpt.finetune import finetune

    out = _run_folder(args, "finetune")
    ft_cfg = _from_flags(FinetuneConfig, args, lora=_from_flags(LoRAConfig, args, "lora_"))
    result = finetune(
        args.model,
        args.data,
        out,
        ft_cfg,
        _from_flags(TrainConfig, args),
        val_data=args.val_data,
        resume=args.resume,
        progress=not args.no_progress,
        resume_overrides=_budgets(args),
    )
    _report(result, out)


def _run_folder(args: argparse.Namespace, kind: str) -> Path:
    """--out, or runs/KIND-DATE-TIME for a new run; and SIGTERM from here on stops like Ctrl-C."""
    if args.resume and not args.out:
        raise OmnigptError("--resume needs --out RUN_FOLDER")
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    return Path(args.out) if args.out else Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S")


def _model_config(args: argparse.Namespace) -> ModelConfig:
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if args.untie:
        overrides["tie_embeddings"] = False
    return ModelConfig.from_preset(args.preset, **overrides)


def _budgets(args: argparse.Namespace) -> dict:
    """What a resumed run may change from the command line: its step and time budgets, and its
    batch per process (to keep the global batch on another number of processes)."""
    given = {
        k: getattr(args, k) for k in ("max_steps", "max_seconds") if getattr(args, k) is not None
    }
    for k in ("batch_size", "grad_accum"):  # these flags have defaults: only when typed
        if "--" + k.replace("_", "-") in args.typed:
            given[k] = getattr(args, k)
    return given


def _report(result, out: Path) -> None:
    """After a run that finished on every process: leaves the process group (under torchrun), then
    the main process prints the result and where the run's files are."""
    from omnigpt.train import end_distributed

    end_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result}")
        print(
            f"run folder: {out}  (checkpoints: {out}/best, {out}/latest; loss curve: {out}/loss.png; "
            f"metrics: {out}/metrics.jsonl)"
        )


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
    from omnigpt.hardware import pick_device
    from omnigpt.load import load_model

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
        token_healing=not args.no_token_healing,
    )
    model, tokenizer = load_model(
        args.model, pick_device(args.device), args.tokenizer, args.quantize
    )
    streaming = len(prompts) * opts.num_samples == 1
    if streaming:
        sys.stdout.write(prompts[0])

    def on_text(_row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if args.draft:
        texts = _speculative(model, tokenizer, prompts, opts, args, on_text if streaming else None)
    else:
        texts = generate_text(model, tokenizer, prompts, opts, on_text if streaming else None)
    if streaming:
        sys.stdout.write("\n")
        return
    for i, text in enumerate(texts):
        prompt = prompts[i // opts.num_samples]
        print(f"--- prompt {i // opts.num_samples + 1}, sample {i % opts.num_samples + 1}")
        print(prompt + text)


def _speculative(model, tokenizer, prompts, opts, args, on_text) -> list[str]:
    """generate with --draft: the draft loaded beside the model (its tokenizer must be the same)."""
    from omnigpt.hardware import pick_device
    from omnigpt.load import load_model
    from omnigpt.speculative import speculative_text

    draft, draft_tokenizer = load_model(args.draft, pick_device(args.device))
    reason = tokenizer.differs_from(draft_tokenizer)
    if reason:
        raise OmnigptError(f"--draft {args.draft} has another tokenizer than the model: {reason}")
    texts, stats = speculative_text(
        model, draft, tokenizer, prompts, opts, args.draft_tokens, on_text
    )
    print(
        f"(speculative decoding: {stats.accepted:,} of {stats.proposed:,} proposed tokens kept, "
        f"{stats.acceptance:.0%}; {stats.rounds:,} passes of the model)",
        file=sys.stderr,
    )
    return texts


def _generation_options(args: argparse.Namespace, **values) -> GenerationOptions:
    return _from_flags(GenerationOptions, args, **values)


def cmd_chat(args: argparse.Namespace) -> None:
    from omnigpt.chat import ChatSession, parse_message
    from omnigpt.hardware import pick_device
    from omnigpt.load import load_model

    model, tokenizer = load_model(args.model, pick_device(args.device), quantization=args.quantize)
    session = ChatSession(
        model, tokenizer, _generation_options(args, token_healing=False), args.system
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print("chatting with", args.model, "— /reset starts over, /exit or Ctrl-D leaves")
        if session.sees_media:
            print("/image PATH [text] or /audio PATH [text] puts a file in your message")
        if session.tokenizer.images is not None:
            print("/imagine TEXT draws TEXT into", args.image_dir)
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
        if not text or text == "/reset":
            continue
        if text == "/imagine" or text.startswith("/imagine "):
            _chat_imagine(session, text.removeprefix("/imagine").strip(), args)
            continue
        try:
            dropped = session.add_user(parse_message(text))
        except OmnigptError as e:
            print(f"({e})")
            continue
        if dropped and interactive:
            print(f"(dropped the {dropped} oldest message(s) to stay within the context)")
        sys.stdout.write("assistant> " if interactive else "")
        session.reply(on_text=_write)
        _write("\n")


def _chat_imagine(session, prompt: str, args: argparse.Namespace) -> None:
    """/imagine TEXT in a chat: the model draws TEXT into --image-dir (the conversation is unchanged)."""
    from omnigpt.imagine import imagine, learned_unconditional

    if session.tokenizer.images is None:
        print("(this model does not draw: its tokenizer has no image codes)")
        return
    cfg = 3.0 if learned_unconditional(args.model) else 1.0
    opts = _generation_options(args, token_healing=False)  # the chat's sampling flags
    [image] = imagine(session.model, session.tokenizer, [prompt], opts, cfg)
    folder = Path(args.image_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{len(list(folder.glob('*.png'))):04d}.png"
    image.save(path)
    print(f"(drew {path})")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_imagine(args: argparse.Namespace) -> None:
    from omnigpt.hardware import pick_device
    from omnigpt.imagine import imagine, learned_unconditional, save_images
    from omnigpt.load import load_model
    from omnigpt.pixels import read_rgb

    prompts = args.prompts or [""]
    if args.complete and not args.rows:
        raise OmnigptError("--complete needs --rows N: how many rows of the image to keep")
    if args.rows and not args.complete:
        raise OmnigptError("--rows goes with --complete IMAGE")
    if args.complete:
        read_rgb(args.complete, (1, 1))  # an unreadable image stops here, before the model loads
    if args.num_samples < 1:
        raise OmnigptError(f"-n must be at least 1, not {args.num_samples}")
    model, tokenizer = load_model(args.model, pick_device(args.device), quantization=args.quantize)
    unconditional = learned_unconditional(args.model)
    cfg = args.cfg if args.cfg is not None else (3.0 if unconditional else 1.0)
    if cfg != 1.0 and not unconditional:
        print(
            f"warning: {args.model} never learned to draw without a prompt (trained with "
            "--drop-condition 0), so --cfg guidance has nothing sound to push away from",
            file=sys.stderr,
        )
    opts = _generation_options(args, num_samples=args.num_samples)
    images = imagine(model, tokenizer, prompts, opts, cfg, args.complete, args.rows)
    paths = save_images(images, args.out, args.scale)
    print(
        f"{len(paths)} image{'s' * (len(paths) != 1)} in {args.out} (all on {Path(args.out) / 'sheet.png'})"
    )


def cmd_media(args: argparse.Namespace) -> None:
    """caption / ask / transcribe: one answer per file, printed as it comes."""
    from omnigpt.evaluate import generate_answers
    from omnigpt.hardware import pick_device
    from omnigpt.load import load_model

    kind = "audio" if args.command == "transcribe" else "image"
    prompt = args.question if args.command == "ask" else args.prompt
    model, tokenizer = load_model(args.model, pick_device(args.device), quantization=args.quantize)
    opts = _generation_options(args, token_healing=False)
    for path in args.files:
        record = {kind: str(Path(path).resolve()), "prompt": prompt}
        [answer] = generate_answers(model, tokenizer, [record], opts, progress=False)
        print(f"{path}: {answer}" if len(args.files) > 1 else answer, flush=True)


def cmd_serve(args: argparse.Namespace) -> None:
    from omnigpt.server import serve

    serve(args.model, _from_flags(ServeConfig, args), args.device, args.quantize)


def cmd_make_data(args: argparse.Namespace) -> None:
    from omnigpt.synthetic import write_datasets

    written = write_datasets(
        args.kinds,
        args.out,
        args.n,
        args.seed,
        not args.no_questions,
        args.max_shapes,
        args.max_digits,
        args.draw,
    )
    for path, count in written:
        print(f"{count:,} example{'s' * (count != 1)} in {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from omnigpt.evaluate import evaluate
    from omnigpt.examples import read_records
    from omnigpt.hardware import pick_device
    from omnigpt.load import load_model

    records = read_records(args.data)
    if args.limit:
        records = records[: args.limit]
    metrics = args.metric or ["perplexity"]
    model, tokenizer = load_model(args.model, pick_device(args.device), quantization=args.quantize)
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
    from omnigpt.hf import export_hf
    from omnigpt.load import import_hf, load_model, merge_lora_run

    out = Path(args.out)
    if args.from_hf:
        import_hf(args.from_hf, out)
        print(
            f"converted {args.from_hf} → {out} (an omnigpt checkpoint: generate, fine-tune or --init-from it)"
        )
    elif args.merge_lora:
        merge_lora_run(args.merge_lora, out)
        print(f"merged {args.merge_lora} → {out} (a plain omnigpt checkpoint)")
    else:
        if (out / "model.safetensors").exists():
            raise OmnigptError(f"{out} already holds a model; choose another --out")
        export_hf(*load_model(args.to_hf), out)
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
    "imagine": cmd_imagine,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.typed = {a.split("=")[0] for a in argv if a.startswith("--")}  # the flags given
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
