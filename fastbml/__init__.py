"""fastbml: fused kernels for balanced multimodal learning (OGM-GE, OPM, Diagnosing & Re-learning)."""

__version__ = "0.1.0"
