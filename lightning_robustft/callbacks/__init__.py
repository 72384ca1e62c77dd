"""Lightning callbacks (thin glue over `lightning_robustft.ops` and `lightning_robustft.weight_space`).

The soups and ``run_wiseft`` live in `lightning_robustft.weight_space`; they are re-exported here so that imports
written for earlier versions keep working.
"""

from lightning_robustft.callbacks.dropout_head import DropoutHeadCallback
from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.callbacks.lora import LoRACallback
from lightning_robustft.callbacks.lp_ft import LPFTCallback
from lightning_robustft.callbacks.weight_penalty import WeightPenaltyCallback
from lightning_robustft.callbacks.wise_ft import WiSEFTCallback
from lightning_robustft.weight_space import SoupResult, greedy_soup, run_soup, run_wiseft, uniform_soup

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
