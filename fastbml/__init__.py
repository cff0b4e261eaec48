"""fastbml: fused kernels for balanced multimodal learning (OGM-GE, OPM, PMR, Diagnosing & Re-learning)."""

from .diagnose_relearn import DiagnoseRelearn, FeatureLoader
from .ogm import OGM, ogm_coefficients, ogm_modulate_
from .opm import OPM, opm_drop, opm_drop_probs
from .pmr import PMR, pmr_loss_weights
from .purity import cluster_purity
from .relearn import relearn_strength, soft_reinit_
from .scores import modality_scores
from .unimodal import concat_unimodal_logits, sum_unimodal_logits, unimodal_logits

__version__ = "0.1.0"

__all__ = [
    "OGM",
    "OPM",
    "PMR",
    "DiagnoseRelearn",
    "FeatureLoader",
    "cluster_purity",
    "concat_unimodal_logits",
    "modality_scores",
    "ogm_coefficients",
    "ogm_modulate_",
    "opm_drop",
    "opm_drop_probs",
    "pmr_loss_weights",
    "relearn_strength",
    "soft_reinit_",
    "sum_unimodal_logits",
    "unimodal_logits",
]
