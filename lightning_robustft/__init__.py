"""lightning-robustft: Lightning callbacks that make fine-tuned vision models robust under distribution shift."""

from lightning_robustft.callbacks import DropoutHeadCallback, GMixoutCallback, WiSEFTCallback, run_wiseft
from lightning_robustft.data import DemoDataModule, MultiDomainDataModule
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.models import ImageClassifier
from lightning_robustft.ops import MixoutPasses, average_state_dicts, interpolate_state_dicts

__all__ = [
    "DemoDataModule",
    "DropoutHeadCallback",
    "GMixoutCallback",
    "ImageClassifier",
    "MixoutPasses",
    "MultiDomainDataModule",
    "RobustFTConfigError",
    "WiSEFTCallback",
    "average_state_dicts",
    "interpolate_state_dicts",
    "run_wiseft",
]
