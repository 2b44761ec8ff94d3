"""Training: one PyTorch-native loop parameterised by an objective, with checkpoints and precision policy."""
