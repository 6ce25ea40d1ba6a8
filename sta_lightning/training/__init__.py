"""sta_lightning.training."""
