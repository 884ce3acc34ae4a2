"""Why a run went wrong: TensorBoard histories -> detector findings (evidence, causes, fixes) -> report and plots.

``events`` reads a run's event files, ``detectors`` holds the pure detectors (shared with the online callback
:class:`rlhf_lightning.callbacks.RLHFDiagnostics`), ``report`` is ``rlhf diagnose``, ``plots`` draws the figures.
"""

from rlhf_lightning.diagnose.detectors import DETECTORS, FAMILIES, Finding, run_detectors
from rlhf_lightning.diagnose.events import NoEventsError, read_run
from rlhf_lightning.diagnose.history import History, Series

__all__ = ["DETECTORS", "FAMILIES", "Finding", "History", "NoEventsError", "Series", "read_run", "run_detectors"]
