"""Fused operators used by the detector."""

from retina.ops.focal_loss import sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss"]
