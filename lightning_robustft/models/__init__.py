"""The image-classification LightningModule and its backbone factory."""
