"""Speech recognition on the Free Spoken Digit Dataset: train on three speakers, report word error
rate on the fourth, whom the model never heard.

    python benchmarks/fsdd.py --data ../shared/data/fsdd --out runs/fsdd --test-speaker nicolas

Steps, all through omnigpt's library functions:
1. utterances of several digits, built by joining single-digit recordings with short random gaps
   (written as 8 kHz WAV files plus JSONL transcripts such as "4 1 7"), every recording first cut
   by the same endpointer (`ENDPOINT_DB`: the speakers' recordings were trimmed differently):
   - training: the three other speakers' recordings 5–49, as utterances of 1–5 digits (and,
     for the first stages, of one digit, and of one or two), each recording with its own speed change
     (resampling by 0.84–1.16, which moves pitch and formants as a different voice would),
     microphone colouring, in half of them a tighter endpoint (`perturb`), loudness and background
     noise;
   - validation (for checkpoint choice): the same speakers' recordings 0–4, not speed-changed;
   - test: every one of the held-out speaker's 500 recordings, exactly once, otherwise unchanged,
     in utterances of 2–5 digits;
2. a small model built from nothing (`finetune.new_model`): Whisper-style audio encoder, a small
   decoder, a character tokenizer; trained with `finetune()` in three stages within `--minutes`
   of wall-clock time: single digits (`--stage1-minutes`), one or two digits (`--stage2-minutes`),
   then whole utterances; with an auxiliary CTC loss on the encoder (weight 0.5) and SpecAugment
   masks (two bands of up to 8 mel channels and two spans of up to 8 frames per clip), both in
   training only;
3. greedy transcription of the test utterances from the best checkpoint, by the decoder alone and
   by joint CTC/attention decoding (`--ctc-weight`, chosen on the validation set); WER with jiwer.
   `--score-only` scores the run already in `--out` again.

The last line printed is one JSON object with the settings, times and scores.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile
import torch
from common import build_init, timed, train_in_stages

from omnigpt.evaluate import evaluate
from omnigpt.examples import read_records
from omnigpt.generate import GenerationOptions
from omnigpt.hardware import machine_info
from omnigpt.load import load_model
from omnigpt.media import resample
from omnigpt.synthetic import TRANSCRIBE_PROMPT

RATE = 8000
SPEAKERS = ("george", "jackson", "lucas", "nicolas")


# Every recording is cut to the span where it is within this many dB of its loudest 10 ms. The
# speakers' recordings were trimmed differently: some keep 50-300 ms of near-silence and the
# faint ends of their words (an "s", a "th"), others start and end 15-20 dB below their peak,
# inside the word. One endpointer for all makes the training speakers' clips look like anyone's.
ENDPOINT_DB = -20.0


def endpoint(wave: np.ndarray, floor_db: float) -> np.ndarray:
    """`wave` from its first to its last 10-ms frame within `floor_db` dB of its loudest frame."""
    frame = RATE // 100
    n = len(wave) // frame
    energy = (wave[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(1)
    db = 10 * np.log10(energy + 1e-12)
    loud = np.flatnonzero(db >= db.max() + floor_db)
    return wave[loud[0] * frame : (loud[-1] + 1) * frame]


def read_clips(folder: Path) -> dict[str, list[tuple[int, int, np.ndarray]]]:
    """speaker → [(digit, index, samples)] of every `{digit}_{speaker}_{index}.wav`, endpointed
    at `ENDPOINT_DB` and peak-normalised."""
    clips = defaultdict(list)
    for path in sorted(folder.glob("*.wav")):
        digit, speaker, index = path.stem.split("_")
        wave, rate = soundfile.read(path, dtype="float32")
        assert rate == RATE, f"{path}: {rate} Hz"
        wave = endpoint(wave, ENDPOINT_DB)
        clips[speaker].append((int(digit), int(index), wave / (np.abs(wave).max() + 1e-6)))
    return clips


def join(parts: list[np.ndarray], rng: random.Random, noisy: bool) -> np.ndarray:
    """Clips joined with 50–300 ms gaps (and 50–200 ms at either end), with faint noise throughout."""
    pieces = [np.zeros(int(rng.uniform(0.05, 0.2) * RATE), np.float32)]
    for p in parts:
        pieces += [p, np.zeros(int(rng.uniform(0.05, 0.3) * RATE), np.float32)]
    wave = np.concatenate(pieces)
    snr_db = rng.uniform(15, 40) if noisy else 45
    power = float(np.mean(wave**2)) / 10 ** (snr_db / 10)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, np.sqrt(power), wave.shape)
    return np.clip(wave + noise, -1, 1).astype(np.float32)


def perturb(wave: np.ndarray, rng: random.Random) -> np.ndarray:
    """Another voice, microphone and endpointer, at random:
    - in half the clips, a tighter cut: to within 12-20 dB of the loudest frame (`endpoint`);
    - speed change by resampling: played back at 8 kHz, 0.84–1.16 times as fast, which moves pitch
      and formants;
    - colouring: a spectral tilt of -6 to +3 dB per octave about 1 kHz and, in half the clips, a
      roll-off of up to 40 dB above a cut-off of 1.5–4 kHz (a duller or brighter microphone);
    - loudness."""
    if rng.random() < 0.5:
        wave = endpoint(wave, rng.uniform(-20, -12))
    new_rate = rng.choice(range(6900, 9500, 100))  # 8000 / new_rate: 0.84–1.16; steps of 100 Hz
    wave = resample(torch.from_numpy(wave), RATE, new_rate).numpy()
    spectrum = np.fft.rfft(wave)
    freqs = np.linspace(0, RATE / 2, spectrum.size)
    gain_db = rng.uniform(-6, 3) * np.log2(np.maximum(freqs, 100) / 1000)
    if rng.random() < 0.5:
        gain_db -= 40 * np.clip((freqs - rng.uniform(1500, 4000)) / 1000, 0, 1)
    wave = np.fft.irfft(spectrum * 10 ** (gain_db / 20), n=wave.size)
    return (wave * rng.uniform(0.3, 1.0)).astype(np.float32)


def write_set(out: Path, name: str, utterances: list[tuple[np.ndarray, str]]) -> Path:
    (out / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (wave, text) in enumerate(utterances):
        soundfile.write(out / name / f"{i:06d}.wav", wave, RATE)
        lines.append(
            {"audio": f"{name}/{i:06d}.wav", "prompt": TRANSCRIBE_PROMPT, "completion": text}
        )
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def build_data(
    data: Path, out: Path, test_speaker: str, n_train: int, seed: int
) -> dict[str, Path]:
    rng = random.Random(seed)
    clips = read_clips(data)
    train_pool = [c for s in SPEAKERS if s != test_speaker for c in clips[s] if c[1] >= 5]
    val_pool = [c for s in SPEAKERS if s != test_speaker for c in clips[s] if c[1] < 5]

    def sample(pool, n, augment, digits=(1, 5)):
        utterances = []
        for _ in range(n):
            chosen = rng.sample(pool, rng.randint(*digits))
            parts = [perturb(c[2], rng) if augment else c[2] for c in chosen]
            text = " ".join(str(c[0]) for c in chosen)
            utterances.append((join(parts, rng, noisy=augment), text))
        return utterances

    test = list(clips[test_speaker])
    rng.shuffle(test)
    test_utterances, i = [], 0
    while i < len(test):
        n = rng.randint(2, 5)
        chosen = test[i : i + n]
        i += n
        text = " ".join(str(c[0]) for c in chosen)
        test_utterances.append((join([c[2] for c in chosen], rng, noisy=False), text))
    return {
        "train-1": write_set(out, "train-1", sample(train_pool, n_train // 4, True, (1, 1))),
        "val-1": write_set(out, "val-1", sample(val_pool, 300, False, (1, 1))),
        "train-2": write_set(out, "train-2", sample(train_pool, n_train // 4, True, (1, 2))),
        "val-2": write_set(out, "val-2", sample(val_pool, 300, False, (1, 2))),
        "train": write_set(out, "train", sample(train_pool, n_train, augment=True)),
        "val": write_set(out, "val", sample(val_pool, 300, augment=False)),
        "test": write_set(out, "test", test_utterances),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/fsdd"))
    ap.add_argument("--out", type=Path, default=Path("runs/fsdd"))
    ap.add_argument("--test-speaker", choices=SPEAKERS, default="nicolas")
    ap.add_argument("--train-utterances", type=int, default=40000)
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget, wall-clock")
    ap.add_argument(
        "--stage1-minutes", type=float, default=3.0, help="of the budget, on single digits"
    )
    ap.add_argument(
        "--stage2-minutes", type=float, default=5.0, help="of the budget, on one or two digits"
    )
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument(
        "--audio",
        default="small,sample_rate=8000,n_fft=200,hop_length=80,n_mels=64,max_seconds=8,ctc=0.5,"
        "mask_mels=8,mask_frames=8",
        help="audio encoder spec (see AudioConfig.from_spec)",
    )
    ap.add_argument("--decoder", default="2,4,128", help="decoder layers,heads,width")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ctc-weight", type=float, default=0.5, help="the CTC head's share in joint decoding"
    )
    ap.add_argument(
        "--score-only", action="store_true", help="score the trained run in --out, no training"
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = {}

    if args.score_only:
        sets = {name: args.out / f"{name}.jsonl" for name in ("val", "test")}
        results = []
    else:
        sets, times["data"] = timed(
            build_data, args.data, args.out, args.test_speaker, args.train_utterances, args.seed
        )
        print(f"data: {times['data']}")
        results, times["train"] = train(args, sets)
        print(f"training: {times['train']}")

    model, tokenizer = load_model(args.out / "run-all" / "best")
    model.eval()
    scores, records = {}, {split: read_records(sets[split]) for split in ("val", "test")}
    for name, weight in (("decoder", 0.0), ("joint", args.ctc_weight)):
        for split in ("val", "test"):
            summary, times[f"{split}-{name}"] = timed(
                evaluate,
                model,
                tokenizer,
                records[split],
                ["wer", "exact_match"],
                GenerationOptions(temperature=0, max_new_tokens=16, ctc_weight=weight),
                args.out / f"eval-{split}-{name}",
                progress=False,
                base_dir=args.out,
            )
            scores[f"{split}_{name}"] = summary["metrics"]
    report = {
        "test_speaker": args.test_speaker,
        "test_utterances": len(records["test"]),
        "wer": scores["test_joint"]["wer"],
        "scores": scores,
        "steps": [r.steps for r in results],
        "times": times,
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(report))


def train(args: argparse.Namespace, sets: dict[str, Path]) -> tuple[list, dict]:
    """A model built from nothing, trained in three stages; each stage's result, and the time."""
    init = build_init(
        args.out, sets["train"], args.decoder, block_size=256, seed=args.seed, audio=args.audio
    )

    # Stages from short to long: single digits (the model learns what each digit sounds like),
    # then one or two, then whole utterances (it learns to find each digit in turn). Straight on
    # whole utterances, the loss sits at its no-information level for thousands of steps.
    stages = [
        ("1", sets["train-1"], sets["val-1"], args.stage1_minutes * 60),
        ("2", sets["train-2"], sets["val-2"], args.stage2_minutes * 60),
        ("all", sets["train"], sets["val"], None),
    ]
    return train_in_stages(
        init,
        stages,
        args.out,
        args.minutes,
        args.batch_size,
        args.lr,
        args.seed,
        args.max_steps,
    )


if __name__ == "__main__":
    main()
