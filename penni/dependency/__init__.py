"""What is coupled: channel groups from a torch.fx trace (:func:`channel_graph`, in ``analysis``), what they hold
(``groups``), how a module the analysis does not know passes its channels on (``rules``: the registry and the
tracer), what torch ops do to channels (``ops``), which module a function's parameters belong to
(``functional``) and how reshapes, indexing, splits and permutes move channels (``shapes``).

``shrink`` may only remove a channel together with everything that reads or writes it: the
producing conv's output row, its BatchNorm channel, the input column of every consumer, and,
across a residual addition, the same channel of every other branch. The package derives that
coupling from the traced graph, never from module names:

* the model is traced with :class:`ChannelTracer` (``torch.fx``; PenniConv2d and every module
  with a registered channel rule, e.g. ChannelPadShortcut, are leaves) and run once
  on the example inputs (a ``ShapeProp`` subclass), so every node's output shape is known;
* every channel (dim 1) of every tensor gets an *atom*; producers (Conv2d / PenniConv2d, grouped
  ones included, Linear on ``(N, F)`` inputs) create fresh atoms, channel-wise ops pass the
  atom list through, elementwise ops between tensors with the same channel count *unite* the
  atoms pairwise (union-find: a residual channel stays if any branch needs it), ``torch.cat``
  on dim 1 concatenates the lists, flattening ``(N, C, H, W)`` to ``(N, C*H*W)`` repeats each
  atom ``H*W`` times (so a Linear head's in-features follow their channel);
* a depthwise conv (``groups == in_channels``, ``out_channels = k * in_channels``) is a
  per-channel op: its output channels ``k*c .. k*c+k-1`` share input channel ``c``'s atom, so the
  channel, the conv's weight rows and everything downstream go together (its rows are listed
  as producers of kind "depthwise"). Other grouped convs are ordinary producers and consumers;
  ``shrink`` then keeps their per-group widths equal (``ChannelGraph.conv_groups``);
* functions on one module's parameters (``F.batch_norm`` / ``F.conv2d`` / ``F.linear`` reading
  ``get_attr`` weights: timm's norm + activation layers, same-padding convs) count as that module's
  call (``functional``); ``chunk`` along the channels unites position ``j`` of every part, a slice
  over all channels passes them on, and after a ``permute`` the channels are followed on their new
  dim (ConvNeXt's channels-last MLP: elementwise ops, ``Linear`` on the last dim; a LayerNorm over
  the channels mixes them, so its input and output channels are kept) (``shapes``);
* whatever is not understood (fixed-size channel splits and slices, reshapes of the channel dim and
  ShuffleNet's channel shuffle, normalizations across channels, unknown functions, methods and leaf
  modules, the model inputs and outputs) is *frozen*: its channels are kept, and the group's
  ``frozen`` says which op (one line).

The union-find classes are the :class:`ChannelGroup` s: each lists its producers, its
per-channel BatchNorms and its consumers with their input positions. Modules whose channels
are not created by a plain conv (the CIFAR ResNet's ChannelPadShortcut zero channels, custom
layers) describe themselves with :func:`register_channel_rule` (the model file registers them).

Why torch.fx and not Torch-Pruning's DependencyGraph: shrink needs its own semantics anyway
(constant channels folded into their consumers' biases, residual unions where a channel is kept
if any branch needs it, PENNI's basis axis), penni then needs no extra dependency, and the
traced graph is plain, inspectable data (``ChannelGraph.graph_module``, ``describe()``).
"""
from .analysis import channel_graph
from .groups import ChannelGraph, ChannelGroup, ConsumerUse, InputStats, Producer
from .rules import ChannelRule, ChannelTracer, RuleContext, register_channel_rule, trace

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelRule", "ChannelTracer", "ConsumerUse", "InputStats", "Producer",
           "RuleContext", "channel_graph", "register_channel_rule", "trace"]
