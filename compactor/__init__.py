"""compactor: make models pruned with torch.nn.utils.prune really smaller and faster."""

from .api import compact, plan
from .errors import CompactionError, MaskLoadError, NoPruningFoundError, VerificationError
from .masks import load_pruned
from .plan import Report

__all__ = [
    "compact",
    "plan",
    "load_pruned",
    "Report",
    "CompactionError",
    "NoPruningFoundError",
    "VerificationError",
    "MaskLoadError",
]
__version__ = "0.1.0"
