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


@pytest.mark.parametrize("command", ["prepare", "train", "generate", "convert"])
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
