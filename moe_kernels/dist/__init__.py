"""Expert parallelism: the dispatch layout (more to come: process groups, placement, dispatch/combine)."""
from .layout import dispatch_layout

__all__ = ["dispatch_layout"]
