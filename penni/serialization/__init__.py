"""Persistence: the file format (safetensors plus a JSON recipe), a model's tensors as files hold them, the replay
of the recipe's architecture edits on load, and the registry of model factories a file may name."""
from .factories import get_factory, register_factory, registered_factories
from .format import load, load_state, read_metadata, save, save_state
from .replay import recipe_json
from .tensors import MASK_SUFFIX, PenniFormatError

__all__ = ["MASK_SUFFIX", "PenniFormatError", "get_factory", "load", "load_state", "read_metadata", "recipe_json",
           "register_factory", "registered_factories", "save", "save_state"]
