"""fastbml: fused kernels for balanced multimodal learning (OGM-GE, OPM, Diagnosing & Re-learning,
AGM, PMR, MMPareto)."""

from .agm import AGM, agm_coefficients, agm_score_sums, shapley_weights, subset_masks
from .diagnose_relearn import DiagnoseRelearn, FeatureLoader
from .mmpareto import MMPareto, mmpareto_combine_, mmpareto_weights
from .ogm import OGM, ogm_coefficients, ogm_modulate_
from .opm import OPM, opm_drop, opm_drop_probs
from .pmr import PMR, pmr_loss_weights
from .purity import cluster_purity
from .relearn import relearn_strength, soft_reinit_
from .scores import modality_scores
from .unimodal import concat_unimodal_logits, sum_unimodal_logits, unimodal_logits

__version__ = "0.1.0"

__all__ = [
    "AGM",
    "OGM",
    "OPM",
    "PMR",
    "DiagnoseRelearn",
    "FeatureLoader",
    "MMPareto",
    "agm_coefficients",
    "agm_score_sums",
    "cluster_purity",
    "concat_unimodal_logits",
    "mmpareto_combine_",
    "mmpareto_weights",
    "modality_scores",
    "ogm_coefficients",
    "ogm_modulate_",
    "opm_drop",
    "opm_drop_probs",
    "pmr_loss_weights",
    "relearn_strength",
    "shapley_weights",
    "soft_reinit_",
    "subset_masks",
    "sum_unimodal_logits",
    "unimodal_logits",
]
