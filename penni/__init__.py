"""penni: PENNI model compression (pruned kernel sharing, ICML 2020) in pure PyTorch.

A few calls around your own model and training loop::

    model = penni.decompose(model, d=5)                      # k x k convs -> basis + coefficients
    loss = criterion(out, y) + lam * penni.l1_penalty(model)  # sparse retraining
    penni.prune_channels(model, 0.6, example_inputs)          # optional: whole channel groups, -60% dense MACs
    penni.prune(model, rule="std", s=1.0)                     # zero small coefficients, masks held
    small = penni.shrink(model, example_inputs)               # drop dead channels and bases
    small, report = penni.shrink_with_report(model, example_inputs)  # the same, and what it removed

Importing penni imports ``penni.models``, which registers ``"penni.models:build_model"``: ``penni.load``
always finds penni's own architectures.
"""
from . import models  # noqa: F401  (registers the factory "penni.models:build_model" that penni.load uses)
from .channel_pruning import ChannelPruneReport, prune_channels
from .comparison import compare, macs_reduction
from .conv import FORWARD_MODES, INFERENCE_MODES, PenniConv2d, penni_layers, set_forward_mode
from .decomposition import decompose, svd_factors
from .dependency import channel_graph, register_channel_rule
from .export import export_onnx, to_torch
from .inference import InferencePlan, optimize_for_inference
from .latency import LatencySettings, LatencyTable, latency_table, speedup_target
from .masking import bake_masks, hold_mask
from .profiling import Profile, profile
from .pruning import coefficient_sparsity, hold_zeros, prunable_fraction, prune
from .recipe import Recipe, get_recipe, set_constructor
from .regularization import group_l1_penalty, l1_penalty, sparsity_penalty
from .schedule import AlternatingSchedule
from .serialization import (
    PenniFormatError,
    get_factory,
    load,
    load_state,
    read_metadata,
    recipe_json,
    register_factory,
    registered_factories,
    save,
    save_state,
)
from .shrinking import ShrinkReport, shrink, shrink_with_report
from .unwrap import unwrap_model

__all__ = [
    # the decomposed conv and its forward modes
    "PenniConv2d", "FORWARD_MODES", "INFERENCE_MODES", "set_forward_mode", "penni_layers",
    # decomposition and sparse retraining
    "decompose", "svd_factors", "l1_penalty", "group_l1_penalty", "sparsity_penalty", "AlternatingSchedule",
    # pruning: coefficients (prune) and whole channel groups (prune_channels), masks held
    "prune", "prunable_fraction", "hold_zeros", "coefficient_sparsity", "prune_channels", "ChannelPruneReport",
    "hold_mask", "bake_masks",
    # pruning to a measured speed-up: prune_channels(cost="latency") and its latency tables
    "speedup_target", "LatencySettings", "LatencyTable", "latency_table",
    # shrinking and what is coupled
    "shrink", "shrink_with_report", "ShrinkReport", "channel_graph", "register_channel_rule",
    # cost and comparison
    "profile", "Profile", "compare", "macs_reduction",
    # files: save/load, the recipe, the factory registry
    "save", "load", "save_state", "load_state", "read_metadata", "recipe_json", "PenniFormatError",
    "Recipe", "get_recipe", "set_constructor", "register_factory", "get_factory", "registered_factories",
    # inference and export
    "optimize_for_inference", "InferencePlan", "to_torch", "export_onnx", "unwrap_model",
]
