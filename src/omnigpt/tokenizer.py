"""Tokenizers on Hugging Face `tokenizers`: byte-level BPE, character-level, and loading existing files.

    tok = Tokenizer.train_bpe(texts, vocab_size=4096)   # or Tokenizer.train_char(texts)
    ids = tok.encode("def main():")
    tok.save(run_dir)                                  # writes run_dir/tokenizer.json
    tok = Tokenizer.load(run_dir)                      # tokenizer.json, or GPT-2 vocab.json + merges.txt

Every tokenizer omnigpt trains reserves the same special tokens at ids 0..15, so adding images, audio
or chat later never shifts an id a checkpoint was trained with. Character-level tokenizers fall back
to UTF-8 byte tokens for characters they never saw, so any Unicode text round-trips.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from omnigpt.errors import OmnigptError
from omnigpt.pixels import ImageCodec

EOT = "<|endoftext|>"
PAD = "<|pad|>"
IMAGE = "<|image|>"
AUDIO = "<|audio|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
IMAGE_START = "<|image_start|>"  # an image the model reads or writes as codes (see pixels.py)
IMAGE_END = "<|image_end|>"
N_RESERVED = 6
SPECIAL_TOKENS = [
    EOT,
    PAD,
    IMAGE,
    AUDIO,
    SYSTEM,
    USER,
    ASSISTANT,
    END_OF_TURN,
    IMAGE_START,
    IMAGE_END,
]
SPECIAL_TOKENS += [f"<|reserved_{i}|>" for i in range(N_RESERVED)]
TOKENIZER_FILE = "tokenizer.json"
# a label that is no token id: the position is not a training target (cross-entropy skips it)
IGNORE_INDEX = -100


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with omnigpt's special tokens and file layout."""

    def __init__(self, hf: HFTokenizer, kind: str = "bpe"):
        self.hf = hf
        self._token_texts: list[str] | None = None  # see token_texts()
        self.kind = kind  # "bpe" | "char" | "gpt2" | "file": how it was made, for messages only
        self.images: ImageCodec | None = None  # how image codes map to pixels (see with_images)
        self._code_ids: range | None = None  # see code_ids

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Byte-level BPE (as GPT-2) trained on `texts`; any byte sequence is encodable."""
        min_size = len(SPECIAL_TOKENS) + 256
        if vocab_size < min_size:
            raise OmnigptError(f"BPE vocab_size must be at least {min_size}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, "bpe")

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per character seen in `texts`, plus 256 byte tokens for anything unseen."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        vocab: dict[str, int] = {}
        for tok in SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)] + sorted(chars):
            vocab.setdefault(tok, len(vocab))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf, "char")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_file(str(path)), "file")
        except Exception as e:  # tokenizers raises plain Exception with a Rust message
            if not Path(path).exists():
                raise OmnigptError(f"{path}: tokenizer file not found") from None
            raise OmnigptError(f"{path}: not a valid tokenizer.json ({e})") from None

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """GPT-2's original `vocab.json` + `merges.txt`."""
        try:
            hf = HFTokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        except Exception as e:
            raise OmnigptError(f"{vocab_json}: cannot read GPT-2 vocab/merges ({e})") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(EOT) is not None:
            hf.add_special_tokens([EOT])
        return cls(hf, "gpt2")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.json` file, or a folder holding one (or GPT-2's vocab.json + merges.txt);
        with the image codec saved beside it, if any."""
        path = Path(path)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                tokenizer = cls.from_file(path / TOKENIZER_FILE)
                codec = ImageCodec.load(path)
                return tokenizer.with_images(codec) if codec else tokenizer
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
            raise OmnigptError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) in folder")
        return cls.from_file(path)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self.hf.save(str(path))
        if self.images is not None:
            self.images.save(folder)
        return path

    def with_images(self, codec: ImageCodec) -> Tokenizer:
        """This tokenizer able to write images with `codec`: one token per code, `<|code_0|>` ...,
        added after the text vocabulary (ids a checkpoint trained with them keeps). A tokenizer
        holding image codes already must have exactly as many."""
        have = self.code_ids
        if have is not None and len(have) != codec.n_codes:
            raise OmnigptError(
                f"the tokenizer has {len(have)} image codes, the palette {codec.n_codes}"
            )
        if have is None:
            if self.token_id(IMAGE_START) is None:
                raise OmnigptError(
                    f"the tokenizer has no {IMAGE_START} token: image tokens need a tokenizer "
                    "trained by omnigpt"
                )
            self.hf.add_special_tokens([code_token(i) for i in range(codec.n_codes)])
            self._token_texts = None
        self.images = codec
        first = self.token_id(code_token(0))
        self._code_ids = range(first, first + codec.n_codes)
        return self

    # -- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def eot_id(self) -> int | None:
        return self.token_id(EOT)

    @property
    def code_ids(self) -> range | None:
        """The ids of the image codes (code i is id code_ids[i]), or None without image tokens."""
        if self._code_ids is not None:
            return self._code_ids
        first = self.token_id(code_token(0))
        if first is None:
            return None
        n = 1
        while self.token_id(code_token(n)) == first + n:
            n += 1
        return range(first, first + n)

    def encode_image(self, image) -> list[int]:
        """An image (a path or Pillow image) as the tokens a model reads and writes it with:
        `<|image_start|>`, its codes in raster order, `<|image_end|>`."""
        if self.images is None:
            raise OmnigptError("this tokenizer has no image codes: the model does not write images")
        codes = (self.images.encode(image) + self.code_ids.start).tolist()
        return [self.token_id(IMAGE_START), *codes, self.token_id(IMAGE_END)]

    def decode_image(self, ids) -> object:
        """The Pillow image of an image's code token ids (rows · cols of them, no start or end)."""
        if self.images is None:
            raise OmnigptError("this tokenizer has no image codes: the model does not write images")
        return self.images.decode([i - self.code_ids.start for i in ids])

    def image_grid(self) -> tuple[int, int, int]:
        """Rows and columns of codes per image and the `<|image_start|>` id (zeros without images):
        what `ModelConfig.with_image_grid` takes."""
        if self.images is None:
            return 0, 0, 0
        return self.images.rows, self.images.cols, self.token_id(IMAGE_START)

    def differs_from(self, other: Tokenizer) -> str | None:
        """Why `other` ("it") is not this tokenizer, or None when it is: its images or its text."""
        if other.fingerprint == self.fingerprint:
            return None
        if self.images is None and other.images is not None:
            return "it writes images and this tokenizer does not"
        if self.images is not None:
            reason = self.images.same_as(other.images)
            if reason:
                return reason
        return "its text vocabulary is another"

    @property
    def fingerprint(self) -> str:
        """A short hash of the full tokenizer definition (with its image codec); checkpoints record
        it to catch mismatches."""
        definition = self.hf.to_str() + (self.images.fingerprint if self.images else "")
        return hashlib.sha256(definition.encode()).hexdigest()[:16]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; with allow_special=False a literal "<|end|>" in it stays plain text."""
        if allow_special:
            return self.hf.encode(text, add_special_tokens=False).ids
        self.hf.encode_special_tokens = True
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        finally:
            self.hf.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel on all cores (the Rust side uses a thread pool)."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def token_texts(self) -> list[str]:
        """The text of every token id on its own (computed once, then cached)."""
        if self._token_texts is None:
            ids = [[i] for i in range(self.vocab_size)]
            self._token_texts = self.hf.decode_batch(ids, skip_special_tokens=False)
        return self._token_texts

    def heal(self, ids: list[int]) -> tuple[list[int], list[int] | None]:
        """Token healing: a prompt ending in "def " ends with a lone space token, rare in training
        where the space belongs to the next word (" name"). Returns the prompt without its last
        token, and the ids whose text starts with that token's text (the allowed first tokens);
        or the prompt unchanged and None when no longer token extends the last one."""
        if len(ids) < 2:
            return ids, None
        texts = self.token_texts()
        last = texts[ids[-1]] if ids[-1] < len(texts) else ""
        if not last or "\ufffd" in last or ids[-1] in self.hf.get_added_tokens_decoder():
            return ids, None
        allowed = [i for i, t in enumerate(texts) if t.startswith(last)]
        if not any(len(texts[i]) > len(last) for i in allowed):
            return ids, None
        return ids[:-1], allowed


def code_token(i: int) -> str:
    """The token of image code i."""
    return f"<|code_{i}|>"


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 characters.

    Only a short tail of ids is decoded per token, so streaming stays linear in the output length.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] were already printed
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix, full = self._tail()
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix, full = self._tail()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _tail(self) -> tuple[str, str]:
        """The already-printed context, and that context with the ids not yet printed."""
        decode = self.tokenizer.decode
        return decode(self.ids[self.prefix_offset : self.read_offset]), decode(
            self.ids[self.prefix_offset :]
        )
