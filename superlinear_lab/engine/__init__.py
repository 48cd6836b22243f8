"""superlinear_lab.engine: stateful sessions over the hybrid model and verified on-disk snapshots."""
from .session import Checkpoint, ContextOverflowError, Session, SessionError
from .snapshot import SnapshotCompatibilityError, SnapshotError, SnapshotInfo, SnapshotStore

__all__ = ["Session", "Checkpoint", "SessionError", "ContextOverflowError", "SnapshotStore", "SnapshotInfo",
           "SnapshotError", "SnapshotCompatibilityError"]
