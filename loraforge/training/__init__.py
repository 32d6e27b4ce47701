"""The training layer: data (readers, collate, batch order), the loss, a run's config, data-based
initialisation, the loop, checkpoints, metrics and evaluation."""
