"""Data modules and datasets: ID + named OOD sets, and the embedded demo shift."""

from lightning_robustft.data.demo_datamodule import DemoDataModule
from lightning_robustft.data.multi_domain import MultiDomainDataModule

__all__ = ["DemoDataModule", "MultiDomainDataModule"]
