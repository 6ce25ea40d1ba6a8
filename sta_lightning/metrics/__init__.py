"""sta_lightning.metrics."""
