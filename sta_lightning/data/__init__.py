"""sta_lightning.data."""
