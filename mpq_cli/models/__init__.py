"""Model construction: built-in small-image models, torchvision, user factories, checkpoints."""

from .loading import ModelSpec, build_model, list_models, load_checkpoint, unique_state_dict, with_aliases

__all__ = ["ModelSpec", "build_model", "list_models", "load_checkpoint", "unique_state_dict", "with_aliases"]
