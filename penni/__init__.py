"""penni: PENNI model compression (pruned kernel sharing, ICML 2020) in pure PyTorch.

A few calls around your own model and training loop::

    model = penni.decompose(model, d=5)                      # k x k convs -> basis + coefficients
    loss = criterion(out, y) + lam * penni.l1_penalty(model)  # sparse retraining
    penni.prune(model, rule="std", s=1.0)                     # zero small coefficients, masks held
    small = penni.shrink(model, example_inputs)               # drop dead channels and bases
"""
from .channel_pruning import ChannelPruneReport, prune_channels
from .conv import FORWARD_MODES, INFERENCE_MODES, PenniConv2d, penni_layers, set_forward_mode
from .decomposition import decompose, svd_factors
from .masking import bake_masks, hold_mask
from .pruning import coefficient_sparsity, hold_zeros, prunable_fraction, prune
from .recipe import Recipe, get_recipe, set_constructor
from .regularization import group_l1_penalty, l1_penalty, sparsity_penalty
from .schedule import AlternatingSchedule

__all__ = [
    "PenniConv2d", "FORWARD_MODES", "INFERENCE_MODES", "set_forward_mode", "penni_layers",
    "decompose", "svd_factors", "l1_penalty", "group_l1_penalty", "sparsity_penalty", "AlternatingSchedule",
    "prune", "prune_channels", "prunable_fraction", "ChannelPruneReport", "hold_zeros", "hold_mask", "bake_masks", "coefficient_sparsity",
    "Recipe", "get_recipe", "set_constructor",
]

from .comparison import compare, macs_reduction
from .dependency.graph import channel_graph
from .dependency.rules import register_channel_rule
from .export import export_onnx, to_torch
from .inference import InferencePlan, optimize_for_inference
from .profiling import Profile, profile
from .serialization.factories import get_factory, register_factory, registered_factories
from .serialization.format import load, load_state, read_metadata, save, save_state
from .serialization.replay import recipe_json
from .serialization.tensors import PenniFormatError
from .shrinking import ShrinkReport, shrink
from .unwrap import unwrap_model

__all__ += [
    "shrink", "ShrinkReport", "channel_graph", "register_channel_rule",
    "profile", "Profile", "compare", "macs_reduction",
    "save", "load", "save_state", "load_state", "recipe_json", "read_metadata", "PenniFormatError",
    "optimize_for_inference", "InferencePlan", "to_torch", "export_onnx",
]
__all__ += ["register_factory", "get_factory", "registered_factories", "unwrap_model"]
