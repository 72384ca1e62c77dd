"""Lightning callbacks (thin glue over :mod:`lightning_robustft.ops`) and the after-the-fact weight-space tools."""

from lightning_robustft.callbacks.dropout_head import DropoutHeadCallback
from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.callbacks.lora import LoRACallback
from lightning_robustft.callbacks.lp_ft import LPFTCallback
from lightning_robustft.callbacks.model_soup import SoupResult, greedy_soup, run_soup, uniform_soup
from lightning_robustft.callbacks.weight_penalty import WeightPenaltyCallback
from lightning_robustft.callbacks.wise_ft import WiSEFTCallback, run_wiseft

__all__ = [
    "DropoutHeadCallback",
    "GMixoutCallback",
    "LPFTCallback",
    "LoRACallback",
    "SoupResult",
    "WeightPenaltyCallback",
    "WiSEFTCallback",
    "greedy_soup",
    "run_soup",
    "run_wiseft",
    "uniform_soup",
]
