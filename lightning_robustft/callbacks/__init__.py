"""Lightning callbacks: thin glue over :mod:`lightning_robustft.ops`."""
