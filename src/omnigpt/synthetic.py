"""Built-in multimodal data, generated from a seed, so nothing needs downloading.

    scene = shapes_scene(random.Random(0))        # .image (Pillow), .caption, .questions [(q, a), ...]
    clip = keypad_clip(random.Random(0))          # .wave (float32 samples at 8 kHz), .text "4 1 7"

*Shapes*: one to three coloured shapes (circle, square, triangle) of different sizes at random,
non-overlapping places on a light, slightly noisy background. The caption names them left to right
("a red circle and a blue square"); questions ask for a colour, a shape, the count, and which of two
shapes is further left. Every answer is true by construction. A scene's caption is also a prompt to draw
it from (text→image examples), and `find_shapes` / `score_scene` read the shapes back from a drawn
picture: the pixel checker of a model's drawings.

*Keypad tones*: telephone (DTMF) digits, each the sum of a row and a column tone, with random
durations, gaps, loudness and background noise; the transcript is the digits, space-separated. It is
a genuine audio-to-text task: the digits are only in the sound.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnigpt.errors import OmnigptError

# -- shapes ---------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 50, 170),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three")
IMAGE_SIZE = 64  # pixels per side of a generated scene
SHAPE_SIZES = (14, 24)  # smallest and largest shape, in pixels across


@dataclass
class Shape:
    kind: str
    colour: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    size: int  # pixels across


@dataclass
class Scene:
    image: object  # PIL.Image.Image
    shapes: list[Shape]
    caption: str
    questions: list[tuple[str, str]] = field(default_factory=list)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _place(
    rng: random.Random, count: int, size: int, sizes: tuple[int, int] = SHAPE_SIZES
) -> list[Shape]:
    """Non-overlapping shapes (bounding circles apart), retrying until they fit."""
    while True:
        shapes: list[Shape] = []
        for _ in range(200):
            s = rng.randint(*sizes)
            r = s // 2 + 1
            cand = Shape(
                rng.choice(SHAPES),
                rng.choice(list(COLOURS)),
                rng.randint(r, size - r),
                rng.randint(r, size - r),
                s,
            )
            if all(
                math.hypot(cand.x - o.x, cand.y - o.y) > (cand.size + o.size) / 2 + 3
                for o in shapes
            ):
                shapes.append(cand)
            if len(shapes) == count:
                return sorted(shapes, key=lambda sh: sh.x)


def _draw(shapes: list[Shape], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    background = np.full((size, size, 3), rng.randint(225, 250), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-8, 9, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        h = s.size / 2
        box = (s.x - h, s.y - h, s.x + h, s.y + h)
        colour = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif s.kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(s.x, s.y - h), (s.x - h, s.y + h), (s.x + h, s.y + h)], fill=colour)
    return image


def _questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str]]:
    qa = [("how many shapes are there?", NUMBERS[len(shapes)])]
    kinds = [s.kind for s in shapes]
    colours = [s.colour for s in shapes]
    for s in shapes:
        if kinds.count(s.kind) == 1:
            qa.append((f"what colour is the {s.kind}?", s.colour))
        if colours.count(s.colour) == 1:
            qa.append((f"what shape is the {s.colour} one?", s.kind))
    named = [
        s for s in shapes if [(o.colour, o.kind) for o in shapes].count((s.colour, s.kind)) == 1
    ]
    if len(named) >= 2:
        a, b = rng.sample(named, 2)
        left = a if a.x < b.x else b
        qa.append(
            (
                f"which is further left, the {a.colour} {a.kind} or the {b.colour} {b.kind}?",
                f"the {left.colour} {left.kind}",
            )
        )
    return qa


def shapes_scene(
    rng: random.Random,
    size: int = IMAGE_SIZE,
    counts: tuple[int, int] = (1, 3),
    sizes: tuple[int, int] = SHAPE_SIZES,
) -> Scene:
    """A scene of counts[0] to counts[1] shapes (at most three), each sizes[0] to sizes[1] pixels
    across."""
    shapes = _place(rng, rng.randint(*counts), size, sizes)
    caption = _join([f"a {s.colour} {s.kind}" for s in shapes])
    return Scene(_draw(shapes, size, rng), shapes, caption, _questions(shapes, rng))


# -- keypad tones ---------------------------------------------------------------------------------

SAMPLE_RATE = 8000  # Hz, as telephone audio
ROW_HZ = (697, 770, 852, 941)
COLUMN_HZ = (1209, 1336, 1477)
KEYS = {"1": (0, 0), "2": (0, 1), "3": (0, 2), "4": (1, 0), "5": (1, 1), "6": (1, 2),
        "7": (2, 0), "8": (2, 1), "9": (2, 2), "0": (3, 1)}  # fmt: skip
TONE_SECONDS = (0.07, 0.16)  # each key press
GAP_SECONDS = (0.04, 0.15)  # silence between presses, and at either end
SNR_DB = (8.0, 30.0)  # signal-to-noise ratio of the added white noise


@dataclass
class Clip:
    wave: np.ndarray  # float32 samples in [-1, 1] at SAMPLE_RATE
    text: str  # the digits, space-separated


def keypad_clip(rng: random.Random, digits: tuple[int, int] = (1, 6)) -> Clip:
    """A clip of 1 to 6 key presses (by default) with random timing, loudness and noise."""
    keys = [rng.choice(list(KEYS)) for _ in range(rng.randint(*digits))]
    parts = [np.zeros(int(rng.uniform(*GAP_SECONDS) * SAMPLE_RATE), dtype=np.float32)]
    for key in keys:
        n = int(rng.uniform(*TONE_SECONDS) * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        row, col = KEYS[key]
        tone = np.sin(2 * np.pi * ROW_HZ[row] * t + rng.uniform(0, 6.3)) + np.sin(
            2 * np.pi * COLUMN_HZ[col] * t + rng.uniform(0, 6.3)
        )
        parts.append((tone * rng.uniform(0.1, 0.45)).astype(np.float32))
        parts.append(np.zeros(int(rng.uniform(*GAP_SECONDS) * SAMPLE_RATE), dtype=np.float32))
    wave = np.concatenate(parts)
    signal_power = float(np.mean(wave**2))
    noise_power = signal_power / 10 ** (rng.uniform(*SNR_DB) / 10)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, math.sqrt(noise_power), wave.shape)
    return Clip(np.clip(wave + noise, -1, 1).astype(np.float32), " ".join(keys))


# -- as JSONL datasets ----------------------------------------------------------------------------

CAPTION_PROMPT = "describe the image."
TRANSCRIBE_PROMPT = "transcribe the audio."


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_shapes(
    out_dir: str | Path,
    n: int,
    seed: int,
    questions: bool = True,
    counts: tuple[int, int] = (1, 3),
    read: bool = True,
    draw: bool = False,
    sizes: tuple[int, int] = SHAPE_SIZES,
    exclude: frozenset[tuple[str, str]] = frozenset(),
) -> Path:
    """`n` scenes of counts[0]–counts[1] shapes as PNG files under out_dir/images and
    out_dir/shapes.jsonl. When `read`: one caption example per scene, plus one example per question
    when `questions`; when `draw`: one text→image example per scene, its caption as the prompt.
    Scenes with a (colour, kind) in `exclude` are never drawn (to hold combinations out). Returns
    the JSONL path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        scene = shapes_scene(rng, counts=counts, sizes=sizes)
        while exclude.intersection((s.colour, s.kind) for s in scene.shapes):
            scene = shapes_scene(rng, counts=counts, sizes=sizes)
        name = f"images/{seed}-{i:05d}.png"
        scene.image.save(out_dir / name)
        if read:
            records.append({"image": name, "prompt": CAPTION_PROMPT, "completion": scene.caption})
        if read and questions:
            records += [{"image": name, "prompt": q, "completion": a} for q, a in scene.questions]
        if draw:
            records.append({"prompt": scene.caption, "image_out": name})
    return _write_jsonl(out_dir / "shapes.jsonl", records)


def write_keypad(out_dir: str | Path, n: int, seed: int, digits: tuple[int, int] = (1, 6)) -> Path:
    """`n` clips of digits[0]–digits[1] key presses as 8 kHz WAV files under out_dir/audio and
    out_dir/keypad.jsonl (transcription examples). Returns the JSONL path."""
    import soundfile

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        clip = keypad_clip(rng, digits)
        name = f"audio/{seed}-{i:05d}.wav"
        soundfile.write(out_dir / name, clip.wave, SAMPLE_RATE)
        records.append({"audio": name, "prompt": TRANSCRIBE_PROMPT, "completion": clip.text})
    return _write_jsonl(out_dir / "keypad.jsonl", records)


def write_datasets(
    kinds: list[str],
    out_dir: str | Path,
    n: int,
    seed: int,
    questions: bool = True,
    max_shapes: int = 3,
    max_digits: int = 6,
    draw: bool = False,
) -> list[tuple[Path, int]]:
    """The built-in data sets named in `kinds` ("shapes", "keypad") under out_dir; with both, also
    out_dir/all.jsonl holding every example, shuffled. With `draw`, shapes scenes also give
    text→image examples. Returns each JSONL file and its example count."""
    written, lines = [], []
    for kind in dict.fromkeys(kinds):
        if kind == "shapes":
            path = write_shapes(out_dir, n, seed, questions, (1, max_shapes), draw=draw)
        elif kind == "keypad":
            path = write_keypad(out_dir, n, seed, (1, max_digits))
        else:
            raise OmnigptError(f"unknown data set {kind!r} (shapes, keypad)")
        these = path.read_text(encoding="utf-8").splitlines(keepends=True)
        written.append((path, len(these)))
        lines += these
    if len(written) > 1:
        random.Random(seed).shuffle(lines)
        path = Path(out_dir) / "all.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        written.append((path, len(lines)))
    return written


# -- reading shapes back from pixels -------------------------------------------------------------


def find_shapes(image, min_area: int = 6, max_distance: float = 60.0) -> list[Shape]:
    """The shapes a picture of a shapes scene shows, left to right (a pixel checker for drawn
    scenes): each pixel takes the nearest of the five colours or the light background, when within
    `max_distance` of it in RGB (an edge pixel blending two colours is neither); each
    connected patch of one colour of at least `min_area` pixels is a shape, of the kind whose ideal
    outline drawn in the patch's bounding box overlaps it best (intersection over union)."""
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    names = list(COLOURS)
    references = np.array([COLOURS[n] for n in names] + [(237, 237, 237)], dtype=np.float32)
    distance = ((pixels[:, :, None, :] - references) ** 2).sum(-1)  # (H, W, 6)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > max_distance**2] = len(names)  # a blend of colours: no shape's
    found = []
    for index, name in enumerate(names):
        labels, count = ndimage.label(nearest == index)
        for part in range(1, count + 1):
            ys, xs = np.nonzero(labels == part)
            if len(xs) < min_area:
                continue
            box = (labels == part)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

            def overlap(kind: str, box=box) -> float:
                ideal = _outline(kind, box.shape[1], box.shape[0])
                return (ideal & box).sum() / (ideal | box).sum()

            kind = max(SHAPES, key=overlap)
            found.append(Shape(kind, name, int(xs.mean()), int(ys.mean()), int(max(box.shape))))
    return sorted(found, key=lambda s: s.x)


def _outline(kind: str, width: int, height: int, supersample: int = 8) -> np.ndarray:
    """A shape of `kind` filling a width × height box, as a boolean mask, drawn as `_draw` does."""
    from PIL import Image, ImageDraw

    w, h = width * supersample - 1, height * supersample - 1
    canvas = Image.new("L", (w + 1, h + 1), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "square":
        draw.rectangle((0, 0, w, h), fill=255)
    elif kind == "circle":
        draw.ellipse((0, 0, w, h), fill=255)
    else:
        draw.polygon([(w / 2, 0), (0, h), (w, h)], fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX)) > 127


def score_scene(image, wanted: list[tuple[str, str]]) -> dict[str, bool]:
    """How a drawn scene matches the shapes asked for, (colour, kind) left to right: the right
    count, colours, kinds and order, and all of them together ("right")."""
    found = [(s.colour, s.kind) for s in find_shapes(image)]
    count = len(found) == len(wanted)
    return {
        "right": found == list(wanted),
        "count": count,
        "colours": sorted(c for c, _ in found) == sorted(c for c, _ in wanted),
        "kinds": sorted(k for _, k in found) == sorted(k for _, k in wanted),
        "order": count and found == list(wanted),
    }
