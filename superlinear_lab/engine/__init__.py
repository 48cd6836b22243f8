"""superlinear_lab.engine: stateful sessions over the hybrid model and verified on-disk snapshots."""
from .session import Checkpoint, ContextOverflowError, Session, SessionError, SessionState
from .snapshot import (SnapshotCompatibilityError, SnapshotError, SnapshotInfo, SnapshotLimitError,
                       SnapshotNotFoundError, SnapshotProblem, SnapshotStore)

__all__ = ["Session", "SessionState", "Checkpoint", "SessionError", "ContextOverflowError", "SnapshotStore",
           "SnapshotInfo", "SnapshotProblem", "SnapshotError", "SnapshotNotFoundError", "SnapshotLimitError",
           "SnapshotCompatibilityError"]
