"""Scoring models on named validation sets, reading and writing their checkpoints, and writing the result tables.

The layer under the weight-space tools (`lightning_robustft.weight_space`) and the callbacks; it imports
`lightning_robustft.ops` and nothing above it.
"""

from lightning_robustft.evaluation.checkpoint import (
    THETA_0_KEY,
    load_checkpoint,
    load_into,
    load_wiseft_endpoints,
    save_weights_checkpoint,
)
from lightning_robustft.evaluation.loop import (
    CACHE_BYTES,
    cache_batches,
    dataloader_names,
    evaluate_accuracy,
    named_dataloaders,
    resolve_id_set,
    trainer_validation_sets,
)
from lightning_robustft.evaluation.results import (
    DIGITS,
    accuracy_row,
    check_set_names,
    format_row,
    round_row,
    write_results,
)

__all__ = [
    "CACHE_BYTES",
    "DIGITS",
    "THETA_0_KEY",
    "accuracy_row",
    "cache_batches",
    "check_set_names",
    "dataloader_names",
    "evaluate_accuracy",
    "format_row",
    "load_checkpoint",
    "load_into",
    "load_wiseft_endpoints",
    "named_dataloaders",
    "resolve_id_set",
    "round_row",
    "save_weights_checkpoint",
    "trainer_validation_sets",
    "write_results",
]
