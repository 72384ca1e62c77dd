"""The image-classification LightningModule and its backbone factory."""

from lightning_robustft.models.backbones import Backbone, build_backbone
from lightning_robustft.models.classifier import ImageClassifier

__all__ = ["Backbone", "ImageClassifier", "build_backbone"]
