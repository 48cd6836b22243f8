"""superlinear_lab: the hybrid model, sessions, snapshots, routing traces, evaluation and views on top of
`superlinear_kernels`.

    from superlinear_lab import load_model, Session, SnapshotStore, RoutingTrace, intervene
"""
from superlinear_kernels import __version__

from .engine import Session, SnapshotError, SnapshotStore
from .intervene import intervene
from .model import ByteTokenizer, HybridLM, ModelConfig, describe_model, load_model
from .trace import RoutingTrace

__all__ = ["__version__", "load_model", "describe_model", "HybridLM", "ModelConfig", "ByteTokenizer", "Session",
           "SnapshotStore", "SnapshotError", "RoutingTrace", "intervene"]
