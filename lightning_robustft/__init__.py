"""lightning-robustft: Lightning callbacks that make fine-tuned vision models robust under distribution shift."""

from lightning_robustft import compare  # a callable package: lightning_robustft.compare(config, methods, ...)
from lightning_robustft.callbacks import (
    DropoutHeadCallback,
    GMixoutCallback,
    LoRACallback,
    LPFTCallback,
    WeightPenaltyCallback,
    WiSEFTCallback,
)
from lightning_robustft.data import DemoDataModule, MultiDomainDataModule
from lightning_robustft.errors import RobustFTConfigError
from lightning_robustft.models import ImageClassifier
from lightning_robustft.ops import MixoutPasses
from lightning_robustft.weight_space import (
    SoupResult,
    average_state_dicts,
    greedy_soup,
    interpolate_state_dicts,
    run_soup,
    run_wiseft,
    uniform_soup,
)

__all__ = [
    "DemoDataModule",
    "DropoutHeadCallback",
    "GMixoutCallback",
    "ImageClassifier",
    "LPFTCallback",
    "LoRACallback",
    "MixoutPasses",
    "MultiDomainDataModule",
    "RobustFTConfigError",
    "SoupResult",
    "WeightPenaltyCallback",
    "WiSEFTCallback",
    "average_state_dicts",
    "compare",
    "greedy_soup",
    "interpolate_state_dicts",
    "run_soup",
    "run_wiseft",
    "uniform_soup",
]
