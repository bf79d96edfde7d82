import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from omnigpt.cli import build_parser, main
from tests.conftest import CORPUS

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "48"]


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_has_help():
    for parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    "command",
    ["prepare", "train", "finetune", "chat", "evaluate", "generate", "convert", "imagine"],
)
def test_help_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: omnigpt " + command in capsys.readouterr().out


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """corpus → prepare → train → a run folder, all through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(CORPUS)
    assert (
        main(
            [
                "prepare",
                str(root / "corpus.txt"),
                "--out",
                str(root / "data"),
                "--tokenizer",
                "char",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(root / "data"),
                "--out",
                str(root / "run"),
                *TINY,
                "--max-steps",
                "60",
                "--batch-size",
                "8",
                "--lr",
                "3e-3",
                "--eval-interval",
                "30",
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def test_prepare_train_generate_end_to_end(trained_run, capsys):
    assert (trained_run / "run/best/model.safetensors").is_file()
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained_run / "run"),
                "def ",
                "--max-new-tokens",
                "30",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > 10


def test_generate_batched_prompts_and_samples(trained_run, capsys):
    prompts = trained_run / "prompts.txt"
    prompts.write_text("def \nclass \n")
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained_run / "run"),
                "--prompt-file",
                str(prompts),
                "--num-samples",
                "2",
                "--max-new-tokens",
                "10",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("--- prompt") == 4 and "prompt 2, sample 2" in out


def test_module_entry_point_reports_missing_model():
    run = subprocess.run(
        [sys.executable, "-m", "omnigpt", "generate", "--model", "MISSING"],
        input="x",
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith(
        "omnigpt: error: MISSING: no such folder, nor a model in the local"
    )


def _fails_cleanly(args, capsys, match: str):
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omnigpt: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_bad_inputs_give_one_clear_line(trained_run, tmp_path, capsys):
    run = trained_run / "run"
    digest = _tree_digest(run)
    _fails_cleanly(
        ["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")],
        capsys,
        "no such file",
    )
    (tmp_path / "empty.txt").write_text("")
    _fails_cleanly(
        ["prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "d")], capsys, "is empty"
    )
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    _fails_cleanly(
        ["prepare", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "d")], capsys, "not UTF-8"
    )
    _fails_cleanly(
        [
            "train",
            "--data",
            str(trained_run / "data"),
            "--preset",
            "gpt5",
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
        "unknown preset 'gpt5'",
    )
    _fails_cleanly(
        ["train", "--data", str(trained_run / "data"), "--out", str(run), *TINY],
        capsys,
        "already holds a run",
    )
    _fails_cleanly(
        ["generate", "--model", str(run), "x" * 49], capsys, "longer than the model's context of 48"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other/c.txt").write_text("completely different characters: 0123456789")
    assert (
        main(
            [
                "prepare",
                str(tmp_path / "other/c.txt"),
                "--out",
                str(tmp_path / "other/d"),
                "--tokenizer",
                "char",
            ]
        )
        == 0
    )
    capsys.readouterr()
    _fails_cleanly(
        ["generate", "--model", str(run), "--tokenizer", str(tmp_path / "other/d"), "x"],
        capsys,
        "does not match checkpoint",
    )
    assert _tree_digest(run) == digest  # none of this touched the run folder


def test_corrupt_checkpoint_and_resume_errors(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    for name in ("best", "latest"):
        weights = run / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
    _fails_cleanly(["generate", "--model", str(run), "def "], capsys, "corrupt or truncated")
    digest = _tree_digest(run)
    _fails_cleanly(
        ["train", "--resume", "--out", str(run), "--no-progress"], capsys, "corrupt or truncated"
    )
    assert _tree_digest(run) == digest
    _fails_cleanly(
        ["train", "--resume", "--out", str(tmp_path / "none")], capsys, "nothing to resume"
    )


def test_resume_extends_a_finished_run(trained_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "70", "--no-progress"]) == 0
    assert "70 steps" in capsys.readouterr().out


# -- fine-tuning, evaluation and chat -------------------------------------------------------------

PAIRS = [("def add", "return a + b"), ("def sub", "return a - b"), ("class Point", "self.x = x")]


def _write_pairs(path: Path, n: int = 30) -> Path:
    import json

    lines = [
        json.dumps({"prompt": PAIRS[i % 3][0] + ":\n", "completion": PAIRS[i % 3][1]})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


FT_QUICK = ["--max-steps", "6", "--batch-size", "4", "--eval-interval", "3", "--no-progress"]


def test_lora_finetune_evaluate_merge_and_export(trained_run, tmp_path, capsys):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "lora"
    args = ["finetune", "--model", str(trained_run / "run"), "--data", str(data)]
    assert main([*args, "--out", str(run), "--method", "lora", "--lora-rank", "2", *FT_QUICK]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 2" in out and "trainable parameters of" in out
    assert (run / "best/adapter.safetensors").is_file()
    assert not (run / "best/model.safetensors").exists()

    assert (
        main(
            [
                "evaluate",
                "--model",
                str(run),
                "--data",
                str(data),
                "--metric",
                "exact_match",
                "--metric",
                "bleu",
                "--metric",
                "perplexity",
                "--max-new-tokens",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "exact_match:" in out and "bleu:" in out and "perplexity:" in out
    assert (run / "eval-pairs/summary.json").is_file()
    assert len((run / "eval-pairs/predictions.jsonl").read_text().splitlines()) == 30

    assert main(["convert", "--merge-lora", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged/model.safetensors").is_file()
    assert main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    # the merged checkpoint and the exported folder generate what base + adapter generates
    texts = []
    for model in (run, tmp_path / "merged", tmp_path / "hf"):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(model),
                    "def ",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "20",
                ]
            )
            == 0
        )
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2]


def test_finetune_bad_data_fails_cleanly(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n'
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    run = tmp_path / "run"
    _fails_cleanly(
        ["finetune", "--model", str(trained_run / "run"), "--data", str(bad), "--out", str(run)],
        capsys,
        "2 bad line(s): line 2: malformed JSON",
    )
    assert not run.exists()
    _fails_cleanly(
        [
            "finetune",
            "--model",
            str(trained_run / "run"),
            "--data",
            str(bad),
            "--method",
            "partial",
            "--out",
            str(run),
        ],
        capsys,
        "partial fine-tuning needs",
    )


def test_partial_finetune_resumes(trained_run, tmp_path, capsys):
    data = _write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "part"
    args = ["finetune", "--model", str(trained_run / "run"), "--data", str(data), "--out", str(run)]
    assert main([*args, "--method", "partial", "--last-blocks", "1", "--pack", *FT_QUICK]) == 0
    assert (
        main(
            [
                "finetune",
                "--model",
                "unused",
                "--data",
                str(data),
                "--out",
                str(run),
                "--resume",
                "--max-steps",
                "9",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "9 steps" in capsys.readouterr().out


def test_chat_streams_replies_and_keeps_history(trained_run, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "def add"}, '
        '{"role": "assistant", "content": "return a + b"}]}\n' * 20
    )
    run = tmp_path / "chat"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(trained_run / "run"),
                "--data",
                str(data),
                "--out",
                str(run),
                *FT_QUICK,
            ]
        )
        == 0
    )
    session = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnigpt",
            "chat",
            "--model",
            str(run),
            "--system",
            "be brief",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ],
        input="def add\n/reset\ndef sub\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stderr
    assert session.stdout.strip() and "Traceback" not in session.stderr
    assert session.stdout.endswith("\n")  # each reply ends its line


def test_multimodal_commands_end_to_end(tmp_path, capsys, monkeypatch):
    from omnigpt.evaluate import generate_answers
    from omnigpt.generate import GenerationOptions
    from omnigpt.load import load_model

    monkeypatch.chdir(tmp_path)
    assert main(["make-data", "shapes", "keypad", "--out", "media", "-n", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "examples in media/shapes.jsonl" in out and "8 examples in media/keypad.jsonl" in out
    both = Path("media/all.jsonl")
    assert sorted(both.read_text().splitlines()) == sorted(
        (
            Path("media/shapes.jsonl").read_text() + Path("media/keypad.jsonl").read_text()
        ).splitlines()
    )
    small = "tiny,n_layer=1,n_head=2,n_embd=16"
    audio = f"{small},sample_rate=8000,n_fft=200,hop_length=80,n_mels=20,max_seconds=3"
    train = ["train", "--data", str(both), "--vision", small, "--audio", audio, "--out", "run"]
    quick = ["--preset", "nano", "--eval-interval", "3", "--batch-size", "4", "--no-progress"]
    assert main([*train, *quick, "--max-steps", "3"]) == 0
    assert main(["train", "--out", "run", "--resume", "--max-steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "new model in run/init" in out and "done: 5 steps" in out

    # each command answers as the library does, one line per file
    model, tok = load_model("run")
    opts = GenerationOptions(temperature=0, max_new_tokens=6)

    def expected(record):
        return generate_answers(model, tok, [record], opts, progress=False)[0]

    image, clip = "media/images/1-00000.png", "media/audio/1-00000.wav"
    n = ["--max-new-tokens", "6"]
    assert main(["caption", "--model", "run", image, "media/images/1-00001.png", *n]) == 0
    assert main(["ask", "--model", "run", image, "how many shapes are there?", *n]) == 0
    assert main(["transcribe", "--model", "run", clip, *n]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{image}: " + expected({"image": image, "prompt": "describe the image."}),
        "media/images/1-00001.png: "
        + expected({"image": "media/images/1-00001.png", "prompt": "describe the image."}),
        expected({"image": image, "prompt": "how many shapes are there?"}),
        expected({"audio": clip, "prompt": "transcribe the audio."}),
    ]
    _fails_cleanly(
        ["transcribe", "--model", "run", "nope.wav"], capsys, "nope.wav: audio file not found"
    )
    _fails_cleanly(
        ["transcribe", "--model", "run", clip, "--ctc-weight", "0.5"],
        capsys,
        "--ctc-weight needs a model trained with a CTC head",
    )

    # a chat turn can bring an image or a clip; a bad path is reported and the chat goes on
    session = subprocess.run(
        [sys.executable, "-m", "omnigpt", "chat", "--model", "run", "--temperature", "0", *n],
        input=f"/image {image} what colour?\n/audio nope.wav hi\n/audio {clip}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stderr
    replies = session.stdout.splitlines()
    assert len(replies) == 3 and replies[1] == "(nope.wav: audio file not found)", replies
