"""Expert parallelism: the dispatch layout, expert placement, dispatch/combine (``ep.ExpertParallel``)."""
from .layout import dispatch_layout
from .place import Topology, evaluate, place_experts, routing_stats
from .placement import Placement, default_placement, replica_rank

__all__ = ["dispatch_layout", "place_experts", "evaluate", "routing_stats", "Topology", "Placement",
           "default_placement", "replica_rank", "ExpertParallel", "ExpertTensorParallel", "load_full_experts",
           "LowLatencyEP", "enable_low_latency"]


def __getattr__(name):  # ExpertParallel imports torch.distributed machinery: load it on first use
    if name == "ExpertParallel":
        from .ep import ExpertParallel

        return ExpertParallel
    if name in ("LowLatencyEP", "enable_low_latency"):
        from . import low_latency

        return getattr(low_latency, name)
    if name in ("ExpertTensorParallel", "load_full_experts"):
        from . import tp

        return getattr(tp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
