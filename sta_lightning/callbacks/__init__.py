"""sta_lightning.callbacks."""
