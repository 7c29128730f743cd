"""Moved to :mod:`d2kd.structures.taps` (heads and modeling both read it); re-exported here for
heads written against earlier releases (``from d2kd.modeling.taps import StudentTaps``)."""
from ..structures.taps import StudentTapper, StudentTaps, TeacherOutputs

__all__ = ["StudentTapper", "StudentTaps", "TeacherOutputs"]
