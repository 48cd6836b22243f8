"""superlinear_lab: the hybrid model, sessions, snapshots, routing traces, evaluation and views on top of
`superlinear_kernels`.

    from superlinear_lab import load_model, Session, SnapshotStore, RoutingTrace
"""
from .engine import Session, SnapshotError, SnapshotStore
from .model import ByteTokenizer, HybridLM, ModelConfig, load_model
from .trace import RoutingTrace

__all__ = ["load_model", "HybridLM", "ModelConfig", "ByteTokenizer", "Session", "SnapshotStore", "SnapshotError",
           "RoutingTrace"]
