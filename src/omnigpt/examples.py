"""Examples: JSONL records in, model inputs out. Reading and checking records, loading the images
and audio they name, encoding them for training and for prompting by the same code, and cutting
them into padded or packed batches.

    records = read_records("pairs.jsonl")                     # checked, every bad line reported
    loader = media_loader(model, "data/")                     # None for a text-only model
    examples, stats = encode_records(tok, records, block_size=256, loader=loader)
    batches = ExampleBatches(examples, 256, batch_size=16, pad_id=pad_id(tok), seed=0)
    x, y, extras = batches.next_batch()                       # (B, T) each; extras: media, packing
    ids, media = encode_prompt(tok, records[0], loader)       # what the model answers from

Records are `{"prompt", "completion"}` or `{"messages": [...]}` (see `template.py` for how they render
to tokens), optionally with "image" / "audio": a path or a list of paths relative to the JSONL file.
Only completion/assistant tokens are targets. Batches are either padded (examples of similar length
together, right-padded: with causal attention no real token ever sees a pad) or packed (several
examples per row, each with its own positions and a block-diagonal causal mask, so attention never
crosses from one into another).
"""

from __future__ import annotations

import functools
import json
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omnigpt.config import AudioConfig, VisionConfig
from omnigpt.errors import OmnigptError
from omnigpt.media import load_audio, load_image, log_mel
from omnigpt.model.fusion import MultimodalGPT
from omnigpt.template import ROLES, MediaCounts, prompt_ids, reference, render, with_placeholders
from omnigpt.tokenizer import AUDIO, IGNORE_INDEX, IMAGE, PAD, Tokenizer

# inputs, targets (already shifted by one), and for multimodal examples a third item: the media
# (see record_media), whose placeholders the inputs hold
Example = tuple
# record → (token counts per placeholder, media): see `media_loader`
MediaLoader = Callable[[dict], tuple[MediaCounts, dict]]


class MediaError(OmnigptError):
    """A record's image or audio cannot be used: missing, unreadable, or no encoder for it."""


# -- reading records -------------------------------------------------------------------------------


def check_record(record: object) -> str | None:
    """Why `record` is not a valid fine-tuning example, or None when it is."""
    if not isinstance(record, dict):
        return "a line must be a JSON object"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"message {i + 1} needs a string 'content'"
            if m.get("role") not in ROLES:
                return f"message {i + 1} has unknown role {m.get('role')!r} (use system, user or assistant)"
            if m["role"] == "system" and i > 0:
                return f"message {i + 1}: a system message may only come first"
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            return "no assistant message to learn from"
        if any(not m["content"].strip() for m in assistant):
            return "empty assistant message"
        return None
    if "image_out" in record:
        if not isinstance(record["image_out"], str):
            return "'image_out' must be the path of an image"
        if not isinstance(record.get("prompt", ""), str):
            return "'prompt' must be a string"
        if "completion" in record or record.get("image") or record.get("audio"):
            return "a text→image example has a 'prompt' and an 'image_out', nothing else"
        return None
    if "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str):
            return "'prompt' must be a string"
        if not isinstance(record.get("completion"), str):
            return "'completion' must be a string"
        if not record["completion"].strip():
            return "empty completion"
        return None
    return "expected 'prompt' and 'completion', or 'messages'"


def read_records(path: str | Path, max_reported: int = 5) -> list[dict]:
    """Every record of a JSONL file, checked; all bad lines are reported together by line number.
    Each record remembers its line number under "_line"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OmnigptError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OmnigptError(f"{path}: cannot read ({e})") from None
    records, bad = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {lineno}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        problem = check_record(record)
        if problem:
            bad.append(f"line {lineno}: {problem}")
        else:
            record["_line"] = lineno  # where it came from, for messages about its media
            if "image_out" in record:  # relative to the JSONL file, as "image" and "audio"
                record["image_out"] = str(path.parent / record["image_out"])
                record.setdefault("prompt", "")
            records.append(record)
    if bad:
        more = f"; and {len(bad) - max_reported} more" if len(bad) > max_reported else ""
        raise OmnigptError(
            f"{path}: {len(bad)} bad line(s): " + "; ".join(bad[:max_reported]) + more
        )
    if not records:
        raise OmnigptError(f"{path}: no examples")
    return records


# -- the media of a record -------------------------------------------------------------------------


def record_media(
    record: dict,
    base_dir: Path,
    vision: VisionConfig | None,
    audio: AudioConfig | None,
) -> tuple[dict[str, list[int]], dict[str, object]]:
    """Loads the files a record names under "image" / "audio" (a path or a list of paths, relative
    to `base_dir`; or the bytes of the files). Returns the token count of each, per placeholder, and the tensors:
    {"images": (N, 3, S, S), "mel": [(n_mels, T), ...]}. Raises OmnigptError naming the file."""
    counts: dict[str, list[int]] = {}
    media: dict[str, object] = {}
    images = _paths(record.get("image"))
    if images:
        if vision is None:
            raise OmnigptError("the example has an image but the model has no image encoder")
        media["images"] = torch.stack(
            [load_image(_at(base_dir, p), vision.image_size) for p in images]
        )
        counts[IMAGE] = [vision.tokens] * len(images)
    clips = _paths(record.get("audio"))
    if clips:
        if audio is None:
            raise OmnigptError("the example has audio but the model has no audio encoder")
        mels = []
        for p in clips:
            mel = log_mel(load_audio(_at(base_dir, p), audio.sample_rate), audio)
            if mel.size(-1) > audio.max_frames:
                where = "audio data" if isinstance(p, bytes) else base_dir / p
                raise OmnigptError(f"{where}: longer than the model's {audio.max_seconds:g} s")
            mels.append(mel)
        media["mel"] = mels
        counts[AUDIO] = [audio.tokens(m.size(-1)) for m in mels]
    return counts, media


def _paths(value) -> list[str | bytes]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str | bytes) for v in value):
        return value
    raise OmnigptError("'image' and 'audio' must be a path or a list of paths")


def _at(base_dir: Path, source: str | bytes) -> Path | bytes:
    """A file path relative to `base_dir`, or the file's bytes as they are."""
    return source if isinstance(source, bytes) else base_dir / source


def collate_media(media: list[dict]) -> dict[str, torch.Tensor]:
    """The media of several examples, in order, as model inputs: images (N, 3, S, S), and clips
    zero-padded to the longest, mel (M, n_mels, T), with their true lengths `frames` (M,). When
    every clip comes with a "transcript" (token ids), also those, concatenated, as `ctc_targets`
    with their lengths `ctc_lengths` (M,)."""
    out: dict[str, torch.Tensor] = {}
    images = [m["images"] for m in media if "images" in m]
    if images:
        out["images"] = torch.cat(images)
    mels = [mel for m in media for mel in m.get("mel", [])]
    if mels:
        longest = max(m.size(-1) for m in mels)
        out["mel"] = torch.stack([F.pad(m, (0, longest - m.size(-1))) for m in mels])
        out["frames"] = torch.tensor([m.size(-1) for m in mels])
        transcripts = [m["transcript"] for m in media if "mel" in m and "transcript" in m]
        if len(transcripts) == len(mels) and all(transcripts):
            out["ctc_targets"] = torch.tensor([t for ids in transcripts for t in ids])
            out["ctc_lengths"] = torch.tensor([len(ids) for ids in transcripts])
    return out


# -- encoding records ------------------------------------------------------------------------------


@dataclass
class ExampleStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0  # unreadable media

    def __str__(self) -> str:
        skipped = f", {self.skipped:,} skipped for unreadable media" if self.skipped else ""
        return f"{self.kept:,} examples ({self.truncated:,} truncated, {self.dropped:,} dropped as too long{skipped})"


def media_loader(model, base_dir: str | Path = ".") -> MediaLoader | None:
    """For a multimodal model, what reads a record's images and audio (paths relative to base_dir);
    None for a model that reads text only."""
    if not isinstance(model, MultimodalGPT):
        return None
    return functools.partial(
        record_media,
        base_dir=Path(base_dir),
        vision=model.vision.config if model.vision else None,
        audio=model.audio.config if model.audio else None,
    )


def _with_media(record: dict, loader: MediaLoader | None) -> tuple[dict, MediaCounts | None, dict]:
    """The record with its placeholders matched to the media it names, their token counts and the
    media themselves; a record of a text-only model (no loader) is returned as it is."""
    if loader is None:
        return record, None, {}
    try:
        counts, media = loader(record)
    except OmnigptError as e:  # the files it names: reported with the record's line
        raise MediaError(str(e)) from None
    return with_placeholders(record, {k: len(v) for k, v in counts.items()}), counts, media


def encode_example(
    tokenizer: Tokenizer, record: dict, loader: MediaLoader | None = None
) -> Example:
    """A record as a training example: inputs, targets (shifted by one) and its media, if any.

    A single clip's answer also goes with it as `transcript`, for a CTC loss on the encoder."""
    record, counts, media = _with_media(record, loader)
    try:
        r = render(tokenizer, record, counts)
    except OmnigptError as e:
        if "image_out" in record:  # the image to learn to draw: reported as media
            raise MediaError(str(e)) from None
        raise
    if len(media.get("mel", [])) == 1:
        media["transcript"] = tokenizer.encode(reference(record).strip(), allow_special=False)
    x, y = r.ids[:-1], r.labels[1:]
    return (x, y, media) if media else (x, y)


def encode_prompt(
    tokenizer: Tokenizer, record: dict, loader: MediaLoader | None = None
) -> tuple[list[int], dict]:
    """A record as a prompt: what the model is given to produce its answer (see
    `template.prompt_ids`), and the media that prompt holds."""
    if loader is None and (record.get("image") or record.get("audio")):
        raise OmnigptError("this model reads text only: it has no image or audio encoder")
    record, counts, media = _with_media(record, loader)
    return prompt_ids(tokenizer, record, counts), media


def encode_records(
    tokenizer: Tokenizer,
    records: list[dict],
    block_size: int,
    too_long: str = "truncate",
    loader: MediaLoader | None = None,
    skip_bad_media: bool = False,
    drop_condition: float = 0.0,
    seed: int = 0,
) -> tuple[list[Example], ExampleStats]:
    """Training examples of at most `block_size` tokens from `records`.

    A seeded `drop_condition` share of the text→image records also gives an example without its
    prompt (classifier-free guidance needs a model that draws unconditionally too).

    Too long: `truncate` cuts the end (the example is dropped if no target token is left), `drop`
    drops it; an example with media, or one that draws, is never cut (that could split an image's
    tokens), only dropped.
    A missing or unreadable media file stops with its path and line, or with `skip_bad_media` is
    reported and its example left out.
    """
    examples, stats = [], ExampleStats()
    rng = random.Random(seed)
    unconditional = [
        {
            "prompt": "",
            "image_out": r["image_out"],
            **({"_line": r["_line"]} if "_line" in r else {}),
        }
        for r in records
        if "image_out" in r and r["prompt"] and rng.random() < drop_condition
    ]
    for record in records + unconditional:
        try:
            x, y, *media = encode_example(tokenizer, record, loader)
        except MediaError as e:
            where = f"line {record['_line']}: " if "_line" in record else ""
            if not skip_bad_media:
                raise OmnigptError(
                    f"{where}{e} (--skip-bad-media leaves such examples out)"
                ) from None
            print(f"skipped {where}{e}", file=sys.stderr)
            stats.skipped += 1
            continue
        if len(x) > block_size:
            if too_long == "drop" or media or "image_out" in record:
                stats.dropped += 1
                continue
            x, y = x[:block_size], y[:block_size]
            if all(t == IGNORE_INDEX for t in y):
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append((x, y, *media))
    stats.kept = len(examples)
    return examples, stats


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that fills rows out to the longest: `<|pad|>`, else `<|endoftext|>`, else 0. It is
    never a target, and with causal attention no real token sees it."""
    for i in (tokenizer.token_id(PAD), tokenizer.eot_id):
        if i is not None:
            return i
    return 0


def _media_inputs(examples: list[Example]) -> dict[str, torch.Tensor]:
    """The examples' images and clips in order of appearance, as model inputs."""
    media = [e[2] for e in examples if len(e) > 2]
    return collate_media(media) if media else {}


def _pad_rows(rows: list[Example], pad_id: int) -> tuple:
    T = max(len(e[0]) for e in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (xi, yi, *_) in enumerate(rows):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return x, y, _media_inputs(rows)


def pack_rows(rows: list[list[Example]], block_size: int, pad_id: int) -> tuple:
    """Rows of several examples each → x, y (B, T), positions (B, T) and a mask (B, 1, T, T) that lets
    a token see only earlier tokens of its own example."""
    B, T = len(rows), block_size
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for seg, (xi, yi, *_) in enumerate(row):
            n = len(xi)
            x[i, start : start + n] = torch.tensor(xi)
            y[i, start : start + n] = torch.tensor(yi)
            positions[i, start : start + n] = torch.arange(n)
            segment[i, start : start + n] = seg
            start += n
        segment[i, start:] = torch.arange(len(row), len(row) + T - start)  # each pad on its own
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    extras = {"positions": positions, "attn_mask": mask[:, None]}
    return x, y, {**extras, **_media_inputs([e for row in rows for e in row])}


def _packed(examples: list[Example], order: list[int], block_size: int) -> list[list[Example]]:
    """Greedy first-fit in `order`: a new row starts when the next example does not fit."""
    rows, row, used = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if row and used + n > block_size:
            rows.append(row)
            row, used = [], 0
        row.append(examples[i])
        used += n
    if row:
        rows.append(row)
    return rows


class ExampleBatches:
    """Endless shuffled fine-tuning batches; resumable, and split across DDP processes.

    Padded mode sorts each chunk of 50 global batches by length before cutting it into batches (so
    padding stays small) and shuffles the batch order. Packed mode fills rows of `block_size`.
    Every process builds the same global batch of `batch_size · world_size` rows and takes its slice.
    """

    def __init__(
        self,
        examples: list[Example],
        block_size: int,
        batch_size: int,
        pad_id: int,
        seed: int,
        pack: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not examples:
            raise OmnigptError("no training examples left")
        self.examples, self.block_size, self.batch_size = examples, block_size, batch_size
        self.pad_id, self.seed, self.pack = pad_id, seed, pack
        self.rank, self.world_size = rank, world_size
        self.epoch, self.cursor = 0, 0
        self._epoch_batches: list[list] | None = None

    def _build_epoch(self) -> list[list]:
        """The global batches of the current epoch: lists of examples (padded) or of rows (packed)."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        G = self.batch_size * self.world_size
        if self.pack:
            units = _packed(self.examples, order, self.block_size)
        else:
            units = []
            chunk = G * 50
            for c in range(0, len(order), chunk):
                part = sorted(order[c : c + chunk], key=lambda i: len(self.examples[i][0]))
                units += [self.examples[i] for i in part]
        batches = [units[i : i + G] for i in range(0, len(units), G)]
        if len(batches) > 1 and len(batches[-1]) < G:
            batches.pop()  # every step sees a full global batch
        if not self.pack:
            rng.shuffle(batches)
        return batches

    def next_batch(self):
        if self._epoch_batches is None:
            self._epoch_batches = self._build_epoch()
        if self.cursor >= len(self._epoch_batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._epoch_batches = self._build_epoch()
        batch = self._epoch_batches[self.cursor]
        self.cursor += 1
        mine = batch[self.rank :: self.world_size]
        if self.pack:
            return pack_rows(mine, self.block_size, self.pad_id)
        return _pad_rows(mine, self.pad_id)

    def batches_per_epoch(self) -> int:
        return len(self._build_epoch())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._epoch_batches = None


def eval_batches(
    examples: list[Example],
    block_size: int,
    batch_size: int,
    pad_id: int,
    pack: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple]:
    """Every example once, in a fixed order (sorted by length when padded); processes split them."""
    if pack:
        rows = _packed(examples, list(range(len(examples))), block_size)[rank::world_size]
        for i in range(0, len(rows), batch_size):
            yield pack_rows(rows[i : i + batch_size], block_size, pad_id)
        return
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))[rank::world_size]
    for i in range(0, len(order), batch_size):
        yield _pad_rows([examples[j] for j in order[i : i + batch_size]], pad_id)
