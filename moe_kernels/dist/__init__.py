"""Expert parallelism: the dispatch layout, expert placement, dispatch/combine (``ep.ExpertParallel``)."""
from .layout import dispatch_layout
from .place import Topology, evaluate, place_experts
from .placement import Placement, default_placement, replica_rank

__all__ = ["dispatch_layout", "place_experts", "evaluate", "Topology", "Placement", "default_placement",
           "replica_rank"]
