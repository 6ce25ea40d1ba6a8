"""sta_lightning.models."""
