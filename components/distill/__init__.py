"""Distillation (DINOv2 §5): a frozen teacher trains a smaller student in the pretraining loop."""
