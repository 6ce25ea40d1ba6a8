"""sta_lightning.nn."""
