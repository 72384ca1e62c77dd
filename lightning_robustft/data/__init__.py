"""Data modules and datasets: ID + named OOD sets, and the embedded demo shift."""
