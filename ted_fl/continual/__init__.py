"""The continual-learning core: networks, loss terms, approaches, one training step, metrics.

Plain PyTorch + MONAI only (no Flower, no Ray), so the centralized runner and the federated
layer make the very same calls and cannot drift apart.
"""

from ted_fl.continual import zoo as _zoo  # noqa: E402,F401 - registers the GKD teachers and students
