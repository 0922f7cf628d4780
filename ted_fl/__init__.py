"""ted-fl: federated, multi-site, domain-continual segmentation with TED distillation."""

from ted_fl.errors import TedFlError

__all__ = ["TedFlError"]
__version__ = "0.1.0"
