"""sta_lightning.plugins: the Lightning extensions the CLI adds to every run.

Checkpoints written atomically and checked when read (``checkpoint_io``), the best/last checkpoint callback
that an exact resume needs (``checkpointing``), random states in checkpoints (``random_state``), SLURM requeue
(``requeue``), BatchNorm synchronised on any device (``layer_sync``) and the W&B logger with an offline
fallback (``loggers``).
"""
