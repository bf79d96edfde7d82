"""Images as tokens: palettes and patch codebooks, exact round trips, fitting, saving with the tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.errors import OmnigptError
from omnigpt.pixels import ImageCodec, contact_sheet
from omnigpt.tokenizer import Tokenizer

PALETTE = [(0, 0, 0), (255, 255, 255), (220, 40, 40), (40, 80, 220)]


def _palette_image(rng, size=8) -> Image.Image:
    pixels = np.asarray(PALETTE, dtype=np.uint8)[rng.integers(0, len(PALETTE), (size, size))]
    return Image.fromarray(pixels)


def test_exact_palette_round_trips_every_pixel():
    rng = np.random.default_rng(0)
    codec = ImageCodec.exact(PALETTE, 8)
    for _ in range(5):
        image = _palette_image(rng)
        codes = codec.encode(image)
        assert codes.shape == (64,) and codes.max() < 4
        assert np.array_equal(np.asarray(codec.decode(codes)), np.asarray(image))


def test_tokenizer_round_trips_an_image_through_token_ids():
    tok = Tokenizer.train_char(["a red circle"]).with_images(ImageCodec.exact(PALETTE, 8))
    image = _palette_image(np.random.default_rng(1))
    ids = tok.encode_image(image)
    assert len(ids) == 64 + 2
    assert ids[0] == tok.token_id("<|image_start|>") and ids[-1] == tok.token_id("<|image_end|>")
    assert all(i in tok.code_ids for i in ids[1:-1])
    assert np.array_equal(np.asarray(tok.decode_image(ids[1:-1])), np.asarray(image))
    assert tok.image_grid() == (8, 8, tok.token_id("<|image_start|>"))


def test_patch_codes_round_trip_an_image_made_of_codebook_patches():
    rng = np.random.default_rng(2)
    book = rng.integers(0, 256, (16, 2, 2, 3))
    codec = ImageCodec(book, 8, 8)
    assert (codec.rows, codec.cols, codec.tokens) == (4, 4, 16)
    codes = rng.integers(0, 16, 16)
    assert np.array_equal(codec.encode(codec.decode(codes)), codes)


def test_kmeans_fit_is_exact_for_few_colours_and_close_for_many():
    rng = np.random.default_rng(3)
    few = [_palette_image(rng) for _ in range(4)]
    codec = ImageCodec.fit(few, codes=8, size=8)
    assert codec.n_codes == 4  # no more colours than that: the palette is exact
    assert np.array_equal(np.asarray(codec.decode(codec.encode(few[0]))), np.asarray(few[0]))

    smooth = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    images = [Image.fromarray(smooth)]
    codec = ImageCodec.fit(images, codes=16, size=16, seed=0)
    assert codec.n_codes == 16
    error = np.abs(np.asarray(codec.decode(codec.encode(images[0])), float) - smooth).mean()
    assert error < 8  # 16 colours for a smooth ramp: within a few levels on average


def test_images_of_another_size_are_resized():
    codec = ImageCodec.exact(PALETTE, 8)
    big = _palette_image(np.random.default_rng(4), size=32)
    assert codec.encode(big).shape == (64,)
    assert codec.decode(codec.encode(big)).size == (8, 8)


def test_palette_specs_and_bad_ones(tmp_path):
    assert ImageCodec.from_spec("#000000,#ffffff", [], 4).n_codes == 2
    path = tmp_path / "palette.json"
    path.write_text(json.dumps(PALETTE))
    assert ImageCodec.from_spec(str(path), [], 4).n_codes == 4
    image = _palette_image(np.random.default_rng(5))
    assert ImageCodec.from_spec("2", [image], 8).n_codes == 2
    for bad in ("#zz0000,#ffffff", str(tmp_path / "none.json"), "#000000"):
        with pytest.raises(OmnigptError):
            ImageCodec.from_spec(bad, [], 4)
    with pytest.raises(OmnigptError, match="multiple of the patch"):
        ImageCodec(np.zeros((4, 3, 3, 3)), 8, 8)


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    codec = ImageCodec.exact(PALETTE, 8)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(OmnigptError, match="bad.png: not a readable image"):
        codec.encode(bad)
    with pytest.raises(OmnigptError, match="no such image file"):
        codec.encode(tmp_path / "missing.png")


def test_codec_is_saved_with_the_tokenizer_and_checked_on_load(tmp_path):
    from tests.conftest import tiny_model

    tok = Tokenizer.train_char(["a red circle"]).with_images(ImageCodec.exact(PALETTE, 4))
    model = tiny_model(tok.vocab_size)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    _, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.images.same_as(tok.images) is None and loaded.fingerprint == tok.fingerprint

    # another palette put in its place: the codes would mean other colours, so it is refused
    ImageCodec.exact(PALETTE[::-1], 4).save(tmp_path / "ckpt")
    with pytest.raises(OmnigptError, match="image_tokens.json is not the one"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "image_tokens.json").unlink()
    with pytest.raises(OmnigptError, match="image_tokens.json is missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_tokenizer_refuses_a_palette_of_another_size():
    tok = Tokenizer.train_char(["x"]).with_images(ImageCodec.exact(PALETTE, 4))
    with pytest.raises(OmnigptError, match="4 image codes, the palette 2"):
        tok.with_images(ImageCodec.exact(PALETTE[:2], 4))
    other = Tokenizer.train_char(["x"]).with_images(ImageCodec.exact(PALETTE, 8))
    assert "its images are 8×8, not 4×4" in tok.differs_from(other)


def test_contact_sheet_scales_every_image():
    images = [_palette_image(np.random.default_rng(i)) for i in range(5)]
    sheet = contact_sheet(images, columns=3, scale=4, gap=2)
    assert sheet.size == (3 * (32 + 2) + 2, 2 * (32 + 2) + 2)
