"""Data modules and datasets: ID + named OOD sets, the embedded demo shift, Hugging Face and WILDS sets."""

from lightning_robustft.data.demo_datamodule import DemoDataModule
from lightning_robustft.data.hf import HFImageSet
from lightning_robustft.data.multi_domain import MultiDomainDataModule
from lightning_robustft.data.wilds import WildsSet

__all__ = ["DemoDataModule", "HFImageSet", "MultiDomainDataModule", "WildsSet"]
