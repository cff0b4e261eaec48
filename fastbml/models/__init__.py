"""Models: ResNet-18 / MLP / transformer encoders, fusion heads, the multimodal classifier."""

from .classifier import (
    INPUT_KINDS,
    InputSpec,
    ModelOutput,
    MultimodalClassifier,
    build_encoder,
    build_model,
    reference_init_,
)
from .encoders import MLPEncoder, TransformerEncoder
from .fusion import (
    FUSIONS,
    ConcatFusion,
    FiLMFusion,
    FusionHead,
    GatedFusion,
    SumFusion,
    build_fusion,
)
from .resnet import FrameResNet18, ResNet18Trunk, SpectrogramResNet18

__all__ = [
    "FUSIONS",
    "INPUT_KINDS",
    "ConcatFusion",
    "FiLMFusion",
    "FrameResNet18",
    "FusionHead",
    "GatedFusion",
    "InputSpec",
    "MLPEncoder",
    "ModelOutput",
    "MultimodalClassifier",
    "ResNet18Trunk",
    "SpectrogramResNet18",
    "SumFusion",
    "TransformerEncoder",
    "build_encoder",
    "build_fusion",
    "build_model",
    "reference_init_",
]
