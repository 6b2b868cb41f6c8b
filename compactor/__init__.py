"""compactor: make models pruned with torch.nn.utils.prune really smaller and faster."""

from .api import compact, plan
from .errors import CompactionError, ExportError, LoadError, MaskLoadError, NoPruningFoundError, VerificationError
from .export import ExportReport, export_onnx, export_program
from .pretrained import save_pretrained
from .saving import load, save, save_pickle
from .masks import load_pruned
from .pruner import PruneReport, prune_channels
from .report import Report, report_of
from .streaming import StreamReport, prune_pretrained

__all__ = [
    "compact",
    "plan",
    "load_pruned",
    "prune_channels",
    "PruneReport",
    "Report",
    "report_of",
    "export_onnx",
    "ExportReport",
    "export_program",
    "save",
    "save_pickle",
    "save_pretrained",
    "prune_pretrained",
    "StreamReport",
    "load",
    "CompactionError",
    "NoPruningFoundError",
    "VerificationError",
    "MaskLoadError",
    "ExportError",
    "LoadError",
]
try:  # one version, pyproject.toml's, read from the installed package's metadata
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("compactor")
except PackageNotFoundError:  # pragma: no cover - imported from a source tree that was never installed
    __version__ = "0+unknown"
