"""Lightning callbacks: thin glue over :mod:`lightning_robustft.ops`."""

from lightning_robustft.callbacks.dropout_head import DropoutHeadCallback
from lightning_robustft.callbacks.gmixout import GMixoutCallback
from lightning_robustft.callbacks.wise_ft import WiSEFTCallback, run_wiseft

__all__ = ["DropoutHeadCallback", "GMixoutCallback", "WiSEFTCallback", "run_wiseft"]
