"""The neural networks: the GPT decoder and the building blocks it shares with encoders."""

from omnigpt.model.attention import Block, KVCache
from omnigpt.model.gpt import GPT

__all__ = ["GPT", "Block", "KVCache"]
