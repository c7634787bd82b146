"""Where models come from and how they are kept."""

from presso.models.card import ModelCard, get_card
from presso.models.directory import is_model_dir, load_model_dir, read_card, save_model_dir
from presso.models.sources import load_model
from presso.models.spec import InputSpec, TensorSpec

__all__ = [
    "InputSpec",
    "ModelCard",
    "TensorSpec",
    "get_card",
    "is_model_dir",
    "load_model",
    "load_model_dir",
    "read_card",
    "save_model_dir",
]
