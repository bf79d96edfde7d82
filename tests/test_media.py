"""Reading images and audio into encoder inputs: any size and format, resampled, clear errors."""

import math

import numpy as np
import pytest
import torch

from omnigpt.errors import OmnigptError
from omnigpt.media import load_audio, load_image, log_mel, resample
from omnigpt.model.fusion import Projector, pixel_shuffle
from omnigpt.model.vision import VisionEncoder
from tests.test_multimodal import AUDIO, VISION


@pytest.mark.parametrize("suffix", ["png", "jpg", "bmp"])
def test_images_of_any_size_and_format_become_encoder_tokens(tmp_path, suffix):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / f"img.{suffix}"
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(path)
    image = load_image(path, VISION.image_size)
    assert image.shape == (3, 32, 32) and -1.0 <= image.min() and image.max() <= 1.0
    features = VisionEncoder(VISION)(image[None])
    assert features.shape == (1, VISION.grid**2, 16)
    tokens = Projector(16, 48, reduce=VISION.shuffle**2)(pixel_shuffle(features, VISION.shuffle))
    assert tokens.shape == (1, VISION.tokens, 48) and VISION.tokens == 4


def test_unreadable_images_name_their_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(OmnigptError, match="broken.png: cannot read image"):
        load_image(bad, 32)
    with pytest.raises(OmnigptError, match="missing.png: image not found"):
        load_image(tmp_path / "missing.png", 32)


@pytest.mark.parametrize("orig,new", [(8000, 16000), (16000, 8000), (8000, 22050), (44100, 16000)])
def test_resampling_keeps_a_tone(orig, new):
    seconds = 0.5
    wave = torch.sin(2 * math.pi * 440 * torch.arange(int(orig * seconds)) / orig)
    out = resample(wave, orig, new)
    assert out.numel() == math.ceil(new * seconds)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(out.numel()) / new)
    edge = new // 50  # the first and last 20 ms see the zero padding
    assert (out - expected)[edge:-edge].abs().max() < 2e-3


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_audio_files_are_read_mono_and_resampled(tmp_path, fmt):
    import soundfile

    rate = 16000
    t = np.arange(rate // 2) / rate
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), np.sin(2 * np.pi * 300 * t)], axis=1) * 0.5
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, stereo.astype(np.float32), rate, format=fmt)
    wave = load_audio(path, AUDIO.sample_rate)
    assert wave.ndim == 1 and wave.numel() == 4000
    assert 0.3 < wave.abs().max() < 0.7


def test_unreadable_audio_names_its_path(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF\x00\x00junk")
    with pytest.raises(OmnigptError, match="noise.wav: cannot read audio"):
        load_audio(bad, 8000)


def test_log_mel_frames_and_the_tone_bin():
    wave = torch.sin(2 * math.pi * 1000 * torch.arange(8000) / 8000.0)  # 1 s at 8 kHz
    mel = log_mel(wave, AUDIO)
    assert mel.shape == (20, 8000 // 80 + 1)
    # 1 kHz sits at mel 1000 of mel(4 kHz) ≈ 2146: filter ≈ 21 · 1000/2146 − 1 ≈ 9
    assert int(mel[:, 50].argmax()) in (8, 9, 10)
