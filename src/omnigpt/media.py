"""Reading images and audio into the tensors the encoders take, with Pillow, soundfile and torch.

    image = load_image("cat.jpg", 64)               # (3, 64, 64), values in [-1, 1]
    wave = load_audio("speech.flac", 16000)        # (samples,) mono, resampled to 16 kHz
    mel = log_mel(wave, AudioConfig())             # (n_mels, frames), one frame per hop_length samples

The log-mel features follow Whisper: a Hann-windowed STFT, power spectrum, a mel filterbank,
log10, a floor 8 (80 dB) below the clip's peak, then (x + 4) / 4 so values sit around [-1, 1].
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omnigpt.config import AudioConfig
from omnigpt.errors import OmnigptError


class _Named(io.BytesIO):
    """The bytes of a file, read as one, named in error messages by what they are."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


# -- images ---------------------------------------------------------------------------------------


def image_tensor(image, size: int) -> torch.Tensor:
    """A Pillow image as (3, size, size) in [-1, 1]: RGB, resized with bicubic filtering."""
    from PIL import Image

    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(path: str | Path | bytes, size: int) -> torch.Tensor:
    """Any format Pillow reads (PNG, JPEG, GIF, BMP, WebP, ...), any size, as (3, size, size); from a
    file, or from the bytes of one."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, bytes):
        path = _Named(path, "image data")
    try:
        with Image.open(path) as image:
            return image_tensor(image, size)
    except FileNotFoundError:
        raise OmnigptError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise OmnigptError(f"{path}: cannot read image ({e})") from None


# -- audio ----------------------------------------------------------------------------------------


def load_audio(path: str | Path | bytes, sample_rate: int) -> torch.Tensor:
    """Mono samples (N,) in [-1, 1] at `sample_rate`, from any file soundfile reads (WAV, FLAC, OGG,
    MP3), or from the bytes of one."""
    import soundfile

    if isinstance(path, bytes):
        path = _Named(path, "audio data")
    elif not Path(path).is_file():
        raise OmnigptError(f"{path}: audio file not found")
    try:
        source = path if isinstance(path, _Named) else str(path)
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
        raise OmnigptError(f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise OmnigptError(f"{path}: audio file holds no samples")
    wave = torch.from_numpy(data.mean(axis=1))
    return resample(wave, rate, sample_rate)


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, width: int = 6) -> torch.Tensor:
    """Band-limited resampling with a Hann-windowed sinc kernel, `width` zero crossings each side.

    The rate ratio is reduced to L/M; each of the L output phases gets its own kernel, applied as one
    strided convolution (the approach of torchaudio's `resample`)."""
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    cutoff = min(orig, new) * 0.99  # just below the lower Nyquist frequency, in units of 1/g Hz
    half = math.ceil(width * orig / cutoff)  # kernel half-length in input samples
    offsets = torch.arange(-half, half + orig, dtype=torch.float64) / orig  # (K,)
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (L, 1)
    t = ((phases + offsets) * cutoff).clamp(-width, width)  # (L, K), in zero crossings
    window = torch.cos(t * math.pi / width / 2) ** 2
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(math.pi * t) / (math.pi * t))
    kernels = (sinc * window * cutoff / orig).to(wave.dtype)[:, None]  # (L, 1, K)
    x = F.pad(wave[None, None], (half, half + orig))
    y = F.conv1d(x, kernels, stride=orig)  # (1, L, frames)
    y = y[0].t().reshape(-1)  # interleave the phases
    return y[: math.ceil(new * wave.numel() / orig)]


@functools.lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, area-normalised (as Slaney): (n_mels, n_fft // 2 + 1)."""

    def to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2))
    lower = (bins[None] - edges[:-2, None]) / (edges[1:-1, None] - edges[:-2, None])
    upper = (edges[2:, None] - bins[None]) / (edges[2:, None] - edges[1:-1, None])
    filters = np.maximum(0.0, np.minimum(lower, upper))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(filters.astype(np.float32))


def log_mel(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Log-mel spectrogram (n_mels, N // hop_length + 1) of mono samples (N,)."""
    window = torch.hann_window(cfg.n_fft, device=wave.device)
    spec = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = spec.abs() ** 2  # (n_fft // 2 + 1, frames)
    filters = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels).to(wave.device)
    mel = (filters @ power).clamp(min=1e-10).log10()
    mel = torch.maximum(mel, mel.max() - 8.0)
    return (mel + 4.0) / 4.0
