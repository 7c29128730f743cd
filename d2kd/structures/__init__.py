"""What the student and its teachers expose to the distillation heads, and what kind of
detector the student is. The core's lowest layer above ``compat`` / ``utils``: heads and
modeling both import it, it imports neither."""
from .levels import level_id
from .student_kind import StudentKind, detector_class, is_dense_detector
from .taps import StudentTapper, StudentTaps, TeacherOutputs

__all__ = ["StudentKind", "StudentTapper", "StudentTaps", "TeacherOutputs", "detector_class",
           "is_dense_detector", "level_id"]
