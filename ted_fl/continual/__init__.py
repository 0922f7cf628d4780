"""The continual-learning core: networks, loss terms, approaches, one training step, metrics.

Plain PyTorch + MONAI only (no Flower, no Ray), so the centralized runner and the federated
layer make the very same calls and cannot drift apart.
"""
