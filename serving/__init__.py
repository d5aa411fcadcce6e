"""Putting a detector in front of a production classifier."""
from serving.guard import Guard, GuardResult

__all__ = ["Guard", "GuardResult"]
