"""Text corpora to token shards, and the loaders that feed training and evaluation.

    summary = prepare(["corpus/"], "data/mycorpus", tokenizer_spec="bpe:4096")
    train = RandomWindows(load_tokens("data/mycorpus/train.bin"), block_size=256, batch_size=16, seed=0)
    x, y = train.next_batch()                  # (B, T) inputs and next-token targets
    for x, y in sequential_windows(load_tokens("data/mycorpus/val.bin"), 256, 16): ...

A prepared folder holds `train.bin` and `val.bin` (flat NumPy token arrays, uint16 when the vocabulary
fits, else uint32), `tokenizer.json` and `meta.json`. Documents are joined with the end-of-text token.

Image files among the inputs (PNG, JPEG, ...) are documents too, for next-pixel pretraining: each
becomes `<|image_start|>`, its codes in raster order, `<|image_end|>` (see `pixels.py`), with a palette
fitted to them (`ImageTokensConfig`), saved beside the tokenizer as `image_tokens.json`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omnigpt.config import ImageTokensConfig
from omnigpt.errors import OmnigptError
from omnigpt.pixels import IMAGE_SUFFIXES, ImageCodec, read_rgb
from omnigpt.tokenizer import IGNORE_INDEX, Tokenizer

TEXT_SUFFIXES_SKIPPED = {
    ".pyc",
    ".so",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".zip",
    ".gz",
    ".bin",
    ".exe",
}
ENCODE_BATCH_DOCS = (
    256  # documents per encode_batch call (the Rust side spreads them over all cores)
)


# -- reading a corpus -----------------------------------------------------------------------------


def stdlib_corpus() -> list[Path]:
    """The built-in corpus: the Python standard library sources of the running interpreter.

    Tests are left out, and so are the codec tables in `encodings/` and the docs string in
    `pydoc_data/`: data, not code, and repetitive enough to dominate what a small model learns.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
    files = [
        p for p in sorted(root.rglob("*.py")) if not skip.intersection(p.relative_to(root).parts)
    ]
    if not files:
        raise OmnigptError(f"no Python sources found under {root} for the built-in corpus")
    return files


def _decode_utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OmnigptError(
            f"{source}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it, or pass --skip-bad-files"
        ) from None


def _expand(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() not in TEXT_SUFFIXES_SKIPPED or is_image_file(p))
            ]
            if not found:
                raise OmnigptError(f"{path}: folder holds no text or image files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise OmnigptError(f"{path}: no such file or folder")
    return files


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _readable_image(path: Path) -> bool:
    try:
        read_rgb(path, (1, 1))
        return True
    except OmnigptError as e:
        print(f"skipped: {e}", file=sys.stderr)
        return False


def read_documents(
    inputs: list[str | Path], text_field: str = "text", skip_bad_files: bool = False
) -> Iterator[str]:
    """Yields documents: each text file whole, or each line's `text_field` of a .jsonl file (image
    files are left out: see `prepare`)."""
    for path in _expand(inputs):
        if is_image_file(path):
            continue
        try:
            raw = path.read_bytes()
            text = _decode_utf8(raw, str(path))
            if path.suffix.lower() != ".jsonl":
                yield text
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise OmnigptError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise OmnigptError(f"{path}:{lineno}: no string field {text_field!r}")
                yield record[text_field]
        except OmnigptError as e:
            if not skip_bad_files:
                raise
            print(f"skipped: {e}", file=sys.stderr)


# -- preparing token shards -----------------------------------------------------------------------


@dataclass
class PrepareSummary:
    documents: int
    tokens: int
    train_tokens: int
    val_tokens: int
    bytes_per_token: float
    vocab_size: int
    out_dir: str

    def __str__(self) -> str:
        return (
            f"{self.documents:,} documents → {self.tokens:,} tokens ({self.train_tokens:,} train, "
            f"{self.val_tokens:,} val), {self.bytes_per_token:.2f} bytes per token, "
            f"vocabulary {self.vocab_size:,}; written to {self.out_dir}"
        )


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def make_tokenizer(spec: str, docs: list[str]) -> Tokenizer:
    """`bpe:N` trains a byte-level BPE of N tokens, `char` a character-level one; else a file/folder."""
    if spec == "char":
        return Tokenizer.train_char(docs)
    if spec.startswith("bpe"):
        _, _, size = spec.partition(":")
        try:
            vocab_size = int(size or 4096)
        except ValueError:
            raise OmnigptError(
                f"bad tokenizer spec {spec!r}; expected bpe:VOCAB_SIZE, e.g. bpe:4096"
            ) from None
        return Tokenizer.train_bpe(docs, vocab_size)
    return Tokenizer.load(spec)


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer_spec: str = "bpe:4096",
    val_fraction: float = 0.1,
    text_field: str = "text",
    skip_bad_files: bool = False,
    seed: int = 0,
    progress: bool = True,
    images: ImageTokensConfig | None = None,
) -> PrepareSummary:
    """Tokenizes a corpus of text and images into `out_dir`: the last `val_fraction` of the token
    stream is validation. Images are read as `images` says (default: ImageTokensConfig()).

    With several documents their order is shuffled (seeded) first, so validation is a sample of
    documents rather than the alphabetically last files.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise OmnigptError(f"val fraction must be in [0, 1), got {val_fraction}")
    docs: list[str | Path] = [d for d in read_documents(inputs, text_field, skip_bad_files) if d]
    texts = [d for d in docs if isinstance(d, str)]
    image_files = [p for p in _expand(inputs) if is_image_file(p)]
    if skip_bad_files:
        image_files = [p for p in image_files if _readable_image(p)]
    if not image_files and not any(d.strip() for d in texts):
        raise OmnigptError(f"corpus {', '.join(map(str, inputs))} is empty")
    docs += image_files
    if len(docs) > 1:
        random.Random(seed).shuffle(docs)

    tokenizer = make_tokenizer(tokenizer_spec, texts) if texts else Tokenizer.train_char([])
    if image_files:
        images = images or ImageTokensConfig()
        codec = ImageCodec.from_spec(
            images.palette, image_files, images.image_size, images.patch, seed
        )
        tokenizer.with_images(codec)
        print(f"images: {codec.describe()}", file=sys.stderr)
    eot = tokenizer.eot_id
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")  # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    n_tokens = 0
    n_bytes = 0
    with (
        open(tmp / "all.bin", "wb") as f,
        tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=not progress) as bar,
    ):
        for i in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = docs[i : i + ENCODE_BATCH_DOCS]
            batch_texts = [d for d in batch if isinstance(d, str)]
            encoded = iter(tokenizer.encode_batch(batch_texts))
            for doc in batch:
                try:
                    ids = next(encoded) if isinstance(doc, str) else tokenizer.encode_image(doc)
                except OmnigptError as e:
                    if not skip_bad_files:
                        raise OmnigptError(f"{e} (--skip-bad-files leaves it out)") from None
                    print(f"skipped: {e}", file=sys.stderr)
                    continue
                if eot is not None:
                    ids.append(eot)
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)
                n_bytes += len(doc.encode("utf-8")) if isinstance(doc, str) else doc.stat().st_size
            bar.update(len(batch))

    tokens = np.memmap(tmp / "all.bin", dtype=dtype, mode="r")
    n_val = int(n_tokens * val_fraction)
    n_train = n_tokens - n_val
    tokens[:n_train].tofile(tmp / "train.bin")
    tokens[n_train:].tofile(tmp / "val.bin")
    del tokens
    os.remove(tmp / "all.bin")
    tokenizer.save(tmp)
    summary = PrepareSummary(
        len(docs), n_tokens, n_train, n_val, n_bytes / n_tokens, tokenizer.vocab_size, str(out_dir)
    )
    meta = {**summary.__dict__, "dtype": dtype.name, "tokenizer_fingerprint": tokenizer.fingerprint}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return summary


def load_tokens(path: str | Path) -> np.ndarray:
    """A token file as a read-only memmap; the dtype comes from meta.json beside it."""
    path = Path(path)
    meta_path = path.parent / "meta.json"
    if not path.is_file() or not meta_path.is_file():
        raise OmnigptError(f"{path}: not a prepared token file (run `omnigpt prepare` first)")
    dtype = np.dtype(json.loads(meta_path.read_text())["dtype"])
    if path.stat().st_size == 0:
        raise OmnigptError(f"{path}: no tokens")
    return np.memmap(path, dtype=dtype, mode="r")


# -- loaders --------------------------------------------------------------------------------------


class RandomWindows:
    """Random windows of `block_size + 1` tokens, drawn reproducibly from a seed.

    Every process draws the same global batch of `batch_size · world_size` window offsets and keeps
    its own slice, so N processes see different data, and together exactly what one process with
    the whole global batch would see.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(tokens) < block_size + 2:
            raise OmnigptError(
                f"only {len(tokens)} tokens: too few for windows of {block_size} (use a smaller --block-size)"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        offsets = torch.randint(
            len(self.tokens) - T - 1, (self.batch_size * self.world_size,), generator=self.generator
        )
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        windows = torch.from_numpy(
            np.stack([self.tokens[i : i + T + 1] for i in mine]).astype(np.int64)
        )
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def sequential_windows(
    tokens: np.ndarray,
    block_size: int,
    batch_size: int,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the whole split once (every token but the first is a target).

    The last window is padded with IGNORE_INDEX targets. `max_batches` > 0 takes that many batches
    spread evenly over the split instead of all of them; processes take every world_size-th batch.
    """
    T = block_size
    starts = list(range(0, len(tokens) - 1, T))
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    if 0 < max_batches < len(batches):
        stride = len(batches) / max_batches
        batches = [batches[int(i * stride)] for i in range(max_batches)]
    for batch in batches[rank::world_size]:
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(batch):
            chunk = torch.from_numpy(tokens[s : s + T + 1].astype(np.int64))
            n = len(chunk) - 1
            x[row, :n] = chunk[:-1]
            y[row, :n] = chunk[1:]
        yield x, y
