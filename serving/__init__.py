"""Putting a detector in front of a production classifier."""
from serving.guard import Guard, GuardResult, GuardStats

__all__ = ["Guard", "GuardResult", "GuardStats"]
