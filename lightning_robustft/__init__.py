"""lightning-robustft: Lightning callbacks that make fine-tuned vision models robust under distribution shift."""

from lightning_robustft.data import MultiDomainDataModule
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.models import ImageClassifier

__all__ = ["ImageClassifier", "MultiDomainDataModule", "RobustFTConfigError"]
