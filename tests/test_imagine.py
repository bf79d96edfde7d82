"""Drawing: 2-D positions, sampling inside an image (masking, KV cache, guidance), learning to draw from
a caption, next-pixel pretraining from a folder of images, and the imagine command's bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from omnigpt.cli import main
from omnigpt.config import GenerationOptions, ImageTokensConfig, ModelConfig, TrainConfig
from omnigpt.errors import OmnigptError
from omnigpt.finetune import train_on_examples
from omnigpt.imagine import imagine, sample_codes
from omnigpt.load import load_model
from omnigpt.model import GPT
from omnigpt.model.gpt import image_code_index
from omnigpt.pixels import ImageCodec
from omnigpt.tokenizer import IMAGE_START, Tokenizer

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture
def drawing_model():
    """An untrained model that writes 4×4 images of a 3-colour palette, with 2-D positions."""
    tok = Tokenizer.train_char(["a red circle and a blue square"])
    tok.with_images(ImageCodec.exact([RED, BLUE, (255, 255, 255)], 4))
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg.with_image_grid(*tok.image_grid())).eval(), tok


def _prompts(tok, texts):
    return [tok.encode(t) + [tok.token_id(IMAGE_START)] for t in texts]


def test_image_places_count_codes_after_each_image_start():
    cfg = ModelConfig(image_rows=2, image_cols=2, image_start_id=9)
    tokens = torch.tensor([[5, 9, 20, 21, 22, 23, 10, 5, 9, 20]])
    assert image_code_index(tokens, cfg).tolist() == [[-1, -1, 0, 1, 2, 3, -1, -1, -1, 0]]


def test_two_d_positions_change_what_a_code_sees(drawing_model):
    model, tok = drawing_model
    ids = torch.tensor([_prompts(tok, ["a red"])[0] + [tok.code_ids.start] * 3])
    with_positions, _ = model(ids)
    without, _ = model(ids, image_index=torch.full_like(ids, -1))
    assert not torch.allclose(with_positions[0, -1], without[0, -1])
    assert torch.allclose(with_positions[0, 0], without[0, 0])  # text tokens: unchanged


def test_cached_sampling_gives_the_logits_of_full_recomputation(drawing_model):
    model, tok = drawing_model
    prompts = _prompts(tok, ["a red circle", "a blue"])  # different lengths: left-padded
    uncond = _prompts(tok, [""]) * 2
    traces = {}
    for cache in (True, False):
        traces[cache] = []
        opts = GenerationOptions(temperature=0)
        codes = sample_codes(
            model,
            prompts,
            16,
            tok.code_ids,
            opts,
            uncond,
            2.0,
            use_cache=cache,
            trace=traces[cache],
        )
        traces[cache] = (codes, torch.stack(traces[cache]))
    assert torch.equal(traces[True][0], traces[False][0])
    assert torch.allclose(traces[True][1], traces[False][1], atol=1e-5)

    # and each step's conditional logits are those of one forward pass over the finished sequence
    (codes, _), trace = traces[True], []
    sample_codes(
        model, prompts[:1], 16, tok.code_ids, GenerationOptions(temperature=0), trace=trace
    )
    sequence = torch.tensor([prompts[0] + [tok.code_ids.start + c for c in codes[0].tolist()]])
    full, _ = model(sequence)
    span = full[0, len(prompts[0]) - 1 : -1, tok.code_ids.start : tok.code_ids.stop]
    assert torch.allclose(torch.stack(trace)[:, 0], span, atol=1e-5)


def test_only_codes_are_sampled_inside_an_image_and_exactly_rows_times_cols(drawing_model):
    model, tok = drawing_model
    prompts = _prompts(tok, ["a red circle"])
    logits, _ = model(torch.tensor(prompts))
    assert int(logits[0, -1].argmax()) not in tok.code_ids  # left alone, it would write text
    images = imagine(
        model, tok, ["a red circle", ""], GenerationOptions(temperature=2.0, seed=0, num_samples=3)
    )
    assert len(images) == 6
    for image in images:
        assert image.size == (4, 4)
        colours = {tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)}
        assert colours <= {RED, BLUE, (255, 255, 255)}
    codes = sample_codes(
        model, prompts * 4, 16, tok.code_ids, GenerationOptions(temperature=5.0, seed=1)
    )
    assert codes.shape == (4, 16) and 0 <= int(codes.min()) and int(codes.max()) < 3


def test_guidance_at_scale_one_is_plain_conditional_sampling(drawing_model):
    model, tok = drawing_model
    prompts = _prompts(tok, ["a red circle", "a blue square"])
    opts = GenerationOptions(temperature=1.0, seed=3)
    plain = sample_codes(model, prompts, 16, tok.code_ids, opts)
    guided = sample_codes(model, prompts, 16, tok.code_ids, opts, _prompts(tok, [""]) * 2, 1.0)
    assert torch.equal(plain, guided)
    pushed = sample_codes(model, prompts, 16, tok.code_ids, opts, _prompts(tok, [""]) * 2, 4.0)
    assert not torch.equal(plain, pushed)


def _two_patterns(folder):
    """'red over blue' and 'blue beside red': 8×8 two-colour images, as text→image examples."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    rows[:4], rows[4:] = RED, BLUE
    cols[:, :4], cols[:, 4:] = BLUE, RED
    Image.fromarray(rows).save(folder / "rows.png")
    Image.fromarray(cols).save(folder / "cols.png")
    lines = [
        {"prompt": "red over blue", "image_out": "rows.png"},
        {"prompt": "blue beside red", "image_out": "cols.png"},
    ]
    data = folder / "draw.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines * 40))
    return data, rows, cols


TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16"]
TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=96)
STEPS = dict(
    batch_size=8, lr=3e-3, eval_interval=40, warmup_steps=5, device="cpu", precision="fp32"
)


def _train_to_draw(tmp_path, steps: int):
    """A tiny model trained `steps` steps on the two patterns, in tmp_path/run; the patterns."""
    data, rows, cols = _two_patterns(tmp_path / "data")
    images = ImageTokensConfig(image_size=8, palette="2")
    config = TrainConfig(max_steps=steps, **STEPS)
    train_on_examples(data, tmp_path / "run", TINY, config, images=images, progress=False)
    return rows, cols


def test_a_tiny_model_learns_to_draw_a_pattern_from_its_caption(tmp_path):
    rows, cols = _train_to_draw(tmp_path, 80)
    model, tok = load_model(tmp_path / "run")
    assert tok.images.n_codes == 2 and (model.config.image_rows, model.config.image_cols) == (8, 8)
    drawn = imagine(
        model, tok, ["red over blue", "blue beside red"], GenerationOptions(temperature=0)
    )
    assert np.array_equal(np.asarray(drawn[0]), rows)
    assert np.array_equal(np.asarray(drawn[1]), cols)
    # completing the top two rows of the "rows" picture finishes it
    [done] = imagine(
        model,
        tok,
        [""],
        GenerationOptions(temperature=0),
        complete=tmp_path / "data" / "rows.png",
        rows=2,
    )
    assert np.array_equal(np.asarray(done)[:2], rows[:2])


def test_imagine_command_writes_samples_and_refuses_bad_input(tmp_path, capsys):
    data, _, _ = _two_patterns(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--image-size", "8", "--palette", "2"]
    args += [
        *TINY_FLAGS,
        "--block-size",
        "96",
        "--max-steps",
        "4",
    ]
    args += ["--batch-size", "4", "--eval-interval", "2", "--no-progress", "--drop-condition", "0"]
    assert main(args) == 0
    out = tmp_path / "drawn"
    assert (
        main(
            [
                "imagine",
                "--model",
                str(run),
                "red over blue",
                "-n",
                "3",
                "--seed",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "0000.png",
        "0001.png",
        "0002.png",
        "sheet.png",
    ]
    assert (
        Image.open(out / "0000.png").size == (8, 8)
        and Image.open(out / "sheet.png").size[0] > 3 * 64
    )
    capsys.readouterr()

    # --cfg on a model that never learned to draw without a prompt: a warning, and it still draws
    assert (
        main(["imagine", "--model", str(run), "x", "--cfg", "3", "--out", str(tmp_path / "g")]) == 0
    )
    assert "never learned to draw without a prompt" in capsys.readouterr().err

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    cases = [
        (["--complete", str(bad), "--rows", "2"], "bad.png: not a readable image"),
        (
            ["--complete", str(tmp_path / "data" / "rows.png"), "--rows", "8"],
            "--rows must be from 1 to 7",
        ),
        (["--complete", str(tmp_path / "data" / "rows.png")], "--complete needs --rows"),
        (["x" * 40], "too short for a prompt of 40 tokens + 8×8 image codes + 2"),
    ]
    for extra, message in cases:
        target = tmp_path / "nothing"
        assert main(["imagine", "--model", str(run), *extra, "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not target.exists()  # nothing written half-way

    text_only = tmp_path / "text.jsonl"
    text_only.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    plain = tmp_path / "plain"
    assert (
        main(
            [
                "train",
                "--data",
                str(text_only),
                "--out",
                str(plain),
                *TINY_FLAGS,
                "--block-size",
                "16",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["imagine", "--model", str(plain), "x", "--out", str(tmp_path / "n")]) == 2
    assert "does not write images" in capsys.readouterr().err


def test_next_pixel_pretraining_on_a_folder_of_images_mixed_with_text(tmp_path, capsys):
    pictures = tmp_path / "corpus"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = np.zeros((20, 12, 3), np.uint8)  # any size: resized to --image-size
        pixels[: rng.integers(4, 16)] = RED
        Image.fromarray(pixels).save(pictures / f"{i}.png" if i % 2 else pictures / f"{i}.jpg")
    (pictures / "notes.txt").write_text("red at the top, black below\n" * 20)
    data = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                str(pictures),
                "--out",
                str(data),
                "--tokenizer",
                "char",
                "--image-size",
                "8",
                "--palette",
                "4",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    tok = Tokenizer.load(data)
    assert tok.images.n_codes <= 4 and tok.images.tokens == 64
    tokens = (
        np.fromfile(data / "train.bin", dtype=np.uint16).tolist()
        + np.fromfile(data / "val.bin", dtype=np.uint16).tolist()
    )
    assert tokens.count(tok.token_id(IMAGE_START)) == 12
    assert sum(t in tok.code_ids for t in tokens) == 12 * 64

    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        *TINY_FLAGS,
    ]
    assert (
        main(
            [
                *args,
                "--block-size",
                "80",
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--eval-interval",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    model, loaded = load_model(run)
    assert model.config.image_rows == 8 and loaded.fingerprint == tok.fingerprint
    assert (
        len(imagine(model, loaded, [""], GenerationOptions(temperature=1.0, seed=0, num_samples=2)))
        == 2
    )

    # starting from a checkpoint whose palette is not the data's: refused with the reason
    other = tmp_path / "other"
    assert (
        main(
            [
                "prepare",
                str(pictures),
                "--out",
                str(other),
                "--tokenizer",
                "char",
                "--image-size",
                "4",
                "--palette",
                "4",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--data",
                str(other),
                "--out",
                str(tmp_path / "r2"),
                "--init-from",
                str(run),
                "--max-steps",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "its images are 8×8, not 4×4" in capsys.readouterr().err


def test_text_to_image_examples_need_a_model_that_draws(tmp_path):
    from omnigpt.checkpoint import save_checkpoint
    from omnigpt.finetune import finetune

    data, _, _ = _two_patterns(tmp_path / "data")
    tok = Tokenizer.train_char(["red over blue"])
    save_checkpoint(
        tmp_path / "text", GPT(ModelConfig(**{**TINY.to_dict(), "vocab_size": tok.vocab_size})), tok
    )
    with pytest.raises(OmnigptError, match="no image tokens to draw with"):
        finetune(tmp_path / "text", data, tmp_path / "ft", progress=False)


def test_one_model_reads_and_writes(tmp_path):
    """Captions (an image encoder reads) and text→image examples (the decoder writes) in one run."""
    data = tmp_path / "data"
    assert (
        main(["make-data", "shapes", "--out", str(data), "-n", "6", "--draw", "--no-questions"])
        == 0
    )
    lines = (data / "shapes.jsonl").read_text().splitlines()
    assert (
        sum('"image_out"' in line for line in lines) == 6
        and sum('"completion"' in line for line in lines) == 6
    )
    images = ImageTokensConfig(image_size=8, palette="8")
    shape = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)
    train_on_examples(
        data / "shapes.jsonl",
        tmp_path / "run",
        shape,
        TrainConfig(max_steps=2, **STEPS),
        vision="tiny",
        images=images,
        progress=False,
    )
    model, tok = load_model(tmp_path / "run")
    assert model.vision is not None and tok.images is not None
    assert (
        len(
            imagine(
                model,
                tok,
                ["a red circle"],
                GenerationOptions(temperature=1.0, seed=0),
                cfg_scale=2.0,
            )
        )
        == 1
    )


def test_text_to_image_examples_target_the_codes_and_some_also_drop_their_prompt(tmp_path):
    from omnigpt.examples import encode_records, read_records

    data, rows, _ = _two_patterns(tmp_path / "data")
    tok = Tokenizer.train_char(["red over blue", "blue beside red"])
    tok.with_images(ImageCodec.exact([RED, BLUE], 8))
    records = read_records(data)
    examples, stats = encode_records(tok, records, 96)
    x, y = examples[0]
    prompt = tok.encode("red over blue")
    assert x[: len(prompt) + 1] == prompt + [tok.token_id(IMAGE_START)]
    targets = [t for t in y if t != -100]
    assert len(targets) == 64 + 1 and targets[-1] == tok.token_id("<|image_end|>")
    assert np.array_equal(np.asarray(tok.decode_image(targets[:-1])), rows)

    examples, _ = encode_records(tok, records, 96, drop_condition=0.25, seed=0)
    unconditional = [e for e in examples if e[0][0] == tok.token_id(IMAGE_START)]
    assert len(examples) == 80 + len(unconditional) and 10 <= len(unconditional) <= 30
    with pytest.raises(OmnigptError, match="drop_condition"):
        from omnigpt.config import FinetuneConfig

        FinetuneConfig(drop_condition=1.5)


def test_chat_draws_on_request(tmp_path):
    import subprocess
    import sys

    _train_to_draw(tmp_path, 2)
    session = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnigpt",
            "chat",
            "--model",
            str(tmp_path / "run"),
            "--image-dir",
            str(tmp_path / "pics"),
            "--seed",
            "0",
        ],
        input="/imagine red over blue\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert session.returncode == 0, session.stderr
    assert f"(drew {tmp_path / 'pics' / '0000.png'})" in session.stdout
    assert Image.open(tmp_path / "pics" / "0000.png").size == (8, 8)
