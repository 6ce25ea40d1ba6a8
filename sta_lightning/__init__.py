"""sta_lightning: YOLOv8 detectors with Super Token Attention, trained with PyTorch Lightning."""
