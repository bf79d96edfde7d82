"""Images as tokens a decoder predicts: a grid of codes, each a colour from a palette (iGPT) or a small
patch of colours from a codebook, read in raster order.

    codec = ImageCodec.fit(images, codes=16, size=32)            # palette by k-means, 32×32 pixels
    codec = ImageCodec.exact([(0, 0, 0), (255, 255, 255)], 8)    # a palette given exactly
    codec = ImageCodec.fit(images, codes=512, size=32, patch=2)  # 2×2-pixel patch codes: 16×16 tokens
    codes = codec.encode(Image.open("x.png"))                    # (rows · cols,) ints in [0, codes)
    image = codec.decode(codes)                                  # a Pillow image of size × size

With `patch=1` every pixel is one token: an image of 32×32 pixels is 1,024 tokens. With `patch=p`
each p×p square of pixels is one token, the codebook entry nearest to it (in RGB distance), so the
same image is 1,024 / p² tokens, at the cost of colours and edges the codebook does not hold.

A codec is saved as `image_tokens.json` beside the tokenizer (the tokenizer carries it: see
`Tokenizer.with_images`), so a checkpoint knows how its image tokens map to pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omnigpt.errors import OmnigptError

CODEC_FILE = "image_tokens.json"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
MAX_CODES = 4096
KMEANS_SAMPLES = 100_000  # patches k-means is fitted on, at most (a seeded sample)


def read_rgb(image, size: tuple[int, int]) -> np.ndarray:
    """An image (a path or a Pillow image) as RGB pixels (height, width, 3) uint8, resized to `size`
    (height, width) unless it has that size already. Raises OmnigptError for an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as opened:
                opened.load()
                image = opened
        except FileNotFoundError:
            raise OmnigptError(f"{image}: no such image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise OmnigptError(f"{image}: not a readable image ({e})") from None
    image = image.convert("RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


@dataclass
class ImageCodec:
    """How an image of `height` × `width` pixels becomes `rows` × `cols` codes and back."""

    codebook: np.ndarray  # (codes, patch, patch, 3) uint8: the colours of each code's pixels
    height: int
    width: int

    def __post_init__(self) -> None:
        self.codebook = np.asarray(self.codebook, dtype=np.uint8)
        if self.codebook.ndim != 4 or self.codebook.shape[3] != 3:
            raise OmnigptError("an image codebook is (codes, patch, patch, 3) RGB colours")
        if not 2 <= len(self.codebook) <= MAX_CODES:
            raise OmnigptError(f"between 2 and {MAX_CODES} codes, not {len(self.codebook)}")
        if self.height % self.patch or self.width % self.patch:
            raise OmnigptError(
                f"image size {self.height}×{self.width} is not a multiple of the patch ({self.patch})"
            )

    # -- making one ------------------------------------------------------------------------------

    @classmethod
    def exact(cls, colours, height: int, width: int | None = None) -> ImageCodec:
        """A palette given exactly: one code per colour (r, g, b), one pixel per code."""
        colours = np.asarray(colours, dtype=np.int64)
        if colours.ndim != 2 or colours.shape[1] != 3 or colours.min() < 0 or colours.max() > 255:
            raise OmnigptError("a palette is a list of [r, g, b] colours, each from 0 to 255")
        return cls(colours.reshape(-1, 1, 1, 3), height, width or height)

    @classmethod
    def fit(
        cls,
        images: list,
        codes: int,
        size: int | tuple[int, int],
        patch: int = 1,
        seed: int = 0,
    ) -> ImageCodec:
        """A palette (patch=1) or patch codebook of `codes` entries fitted by k-means to the pixels
        (or p×p patches) of `images` (paths or Pillow images), resized to `size`."""
        from sklearn.cluster import KMeans

        height, width = (size, size) if isinstance(size, int) else size
        if not images:
            raise OmnigptError("no images to fit the palette to")
        probe = cls(np.zeros((2, patch, patch, 3)), height, width)  # checks size and patch
        patches = np.concatenate([probe._patches(read_rgb(im, (height, width))) for im in images])
        patches = patches.reshape(len(patches), -1)
        rng = np.random.default_rng(seed)
        if len(patches) > KMEANS_SAMPLES:
            patches = patches[rng.choice(len(patches), KMEANS_SAMPLES, replace=False)]
        patches = patches.astype(np.float32)
        distinct = np.unique(patches, axis=0)
        if len(distinct) <= codes:  # no more colours than codes: the palette is exact
            centres = distinct
        else:
            kmeans = KMeans(n_clusters=codes, n_init=1, max_iter=100, random_state=seed)
            centres = kmeans.fit(patches).cluster_centers_
        if len(centres) < 2:
            centres = np.concatenate([centres, 255 - centres])
        codebook = np.clip(np.rint(centres), 0, 255).reshape(-1, patch, patch, 3)
        return cls(codebook, height, width)

    @classmethod
    def from_spec(
        cls, palette: str, images: list, size: int, patch: int = 1, seed: int = 0
    ) -> ImageCodec:
        """`palette` as the command line gives it: a number of codes to fit by k-means, a JSON file
        holding a list of [r, g, b] colours, or colours written out ("#000000,#ff0000,...")."""
        if palette.isdigit():
            return cls.fit(images, int(palette), size, patch, seed)
        if patch != 1:
            raise OmnigptError("a palette given exactly has one pixel per code: use --patch 1")
        if palette.startswith("#"):
            try:
                colours = [
                    [int(c.strip()[i : i + 2], 16) for i in (1, 3, 5)] for c in palette.split(",")
                ]
            except ValueError:
                raise OmnigptError(
                    f"--palette {palette!r}: colours are #rrggbb, comma-separated"
                ) from None
            return cls.exact(colours, size)
        path = Path(palette)
        if not path.is_file():
            raise OmnigptError(
                f"--palette {palette!r}: give a number of colours, a JSON file of [r, g, b] colours, "
                "or #rrggbb colours"
            )
        try:
            return cls.exact(json.loads(path.read_text()), size)
        except json.JSONDecodeError as e:
            raise OmnigptError(f"{path}: not JSON ({e.msg})") from None

    # -- shape -----------------------------------------------------------------------------------

    @property
    def patch(self) -> int:
        return self.codebook.shape[1]

    @property
    def n_codes(self) -> int:
        return len(self.codebook)

    @property
    def rows(self) -> int:
        return self.height // self.patch

    @property
    def cols(self) -> int:
        return self.width // self.patch

    @property
    def tokens(self) -> int:
        """Codes per image."""
        return self.rows * self.cols

    def describe(self) -> str:
        kind = (
            "colour palette"
            if self.patch == 1
            else f"codebook of {self.patch}×{self.patch} patches"
        )
        return (
            f"{self.height}×{self.width} images as {self.rows}×{self.cols} = {self.tokens} tokens, "
            f"{self.n_codes}-entry {kind}"
        )

    # -- converting ------------------------------------------------------------------------------

    def _patches(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) → (rows · cols, p, p, 3) in raster order."""
        p = self.patch
        grid = pixels.reshape(self.rows, p, self.cols, p, 3).transpose(0, 2, 1, 3, 4)
        return grid.reshape(-1, p, p, 3)

    def encode(self, image) -> np.ndarray:
        """The codes (rows · cols,) of an image (a path or Pillow image), resized to the codec's size;
        each the codebook entry nearest in RGB distance."""
        patches = self._patches(read_rgb(image, (self.height, self.width)))
        flat = patches.reshape(len(patches), -1).astype(np.float32)
        book = self.codebook.reshape(self.n_codes, -1).astype(np.float32)
        # |a - b|² = |a|² - 2ab + |b|², without the (N, K, D) difference tensor
        distance = (flat**2).sum(1)[:, None] - 2 * flat @ book.T + (book**2).sum(1)[None]
        return distance.argmin(1)

    def decode(self, codes) -> object:
        """A Pillow image of the codec's size from rows · cols codes."""
        from PIL import Image

        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (self.tokens,) or codes.min() < 0 or codes.max() >= self.n_codes:
            raise OmnigptError(
                f"an image is {self.tokens} codes in [0, {self.n_codes}), got shape {codes.shape}"
            )
        p = self.patch
        grid = self.codebook[codes].reshape(self.rows, self.cols, p, p, 3).transpose(0, 2, 1, 3, 4)
        return Image.fromarray(grid.reshape(self.height, self.width, 3))

    # -- saving ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "patch": self.patch,
            "codebook": self.codebook.reshape(self.n_codes, -1).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageCodec:
        p = d["patch"]
        return cls(np.asarray(d["codebook"]).reshape(-1, p, p, 3), d["height"], d["width"])

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CODEC_FILE
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ImageCodec | None:
        """The codec saved in `folder`, or None when there is none."""
        path = Path(folder) / CODEC_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise OmnigptError(f"{path}: not a valid image codec ({e})") from None

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict()).encode()).hexdigest()[:16]

    def same_as(self, other: ImageCodec | None) -> str | None:
        """Why `other` differs from this codec (None when they are the same)."""
        if other is None:
            return "it has no image tokens"
        if (other.height, other.width) != (self.height, self.width):
            return f"its images are {other.height}×{other.width}, not {self.height}×{self.width}"
        if other.patch != self.patch:
            return (
                f"its codes are {other.patch}×{other.patch} patches, not {self.patch}×{self.patch}"
            )
        if other.n_codes != self.n_codes or not np.array_equal(other.codebook, self.codebook):
            return f"its {other.n_codes}-entry palette is not this {self.n_codes}-entry one"
        return None


def contact_sheet(images: list, columns: int = 8, scale: int = 4, gap: int = 2) -> object:
    """The images side by side on a grid, each scaled up `scale` times (nearest neighbour)."""
    from PIL import Image

    w, h = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new(
        "RGB", (columns * (w * scale + gap) + gap, rows * (h * scale + gap) + gap), "white"
    )
    for i, image in enumerate(images):
        big = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        sheet.paste(
            big, (gap + (i % columns) * (w * scale + gap), gap + (i // columns) * (h * scale + gap))
        )
    return sheet
