"""omnigpt: build, pretrain, fine-tune, evaluate and serve GPT-style language models."""

from omnigpt.config import ModelConfig, TrainConfig
from omnigpt.errors import OmnigptError
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "TrainConfig", "Tokenizer", "OmnigptError", "__version__"]
