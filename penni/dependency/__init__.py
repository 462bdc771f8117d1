"""What is coupled: channel groups derived from a torch.fx trace (analysis), what they hold (groups), and how a
module the analysis does not know passes its channels on (rules)."""
from .graph import channel_graph
from .groups import ChannelGraph, ChannelGroup, ConsumerUse, InputStats, Producer
from .rules import ChannelRule, ChannelTracer, RuleContext, register_channel_rule, trace

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelRule", "ChannelTracer", "ConsumerUse", "InputStats", "Producer",
           "RuleContext", "channel_graph", "register_channel_rule", "trace"]
