"""The spool: staging (staging.py), entries (entries.py), what hooks are handed (env.py), the
per-target ledger (ledger.py), the apply phase (apply.py), tied together by `Spool` (spool.py)."""

from .apply import TargetOutcome
from .entries import NAME_RE, CertFiles, PendingEntry
from .spool import BATCH_ID_RE, Damaged, NotifyOutcome, Spool, StageOutcome, TargetState

__all__ = ["BATCH_ID_RE", "NAME_RE", "CertFiles", "Damaged", "NotifyOutcome", "PendingEntry",
           "Spool", "StageOutcome", "TargetOutcome", "TargetState"]
