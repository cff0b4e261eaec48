"""fastbml: fused kernels for balanced multimodal learning (OGM-GE, OPM, Diagnosing & Re-learning)."""

from .ogm import OGM, ogm_coefficients, ogm_modulate_
from .ops.scores import modality_scores

__version__ = "0.1.0"

__all__ = [
    "OGM",
    "modality_scores",
    "ogm_coefficients",
    "ogm_modulate_",
]
