"""``embedstore audit``: leakage in a feature set (exact and near-duplicates across groups, the official split
and the folds), and how probe and match use an audit (:mod:`embedstore.audit.use`)."""

from embedstore.audit.config import AuditConfig
from embedstore.audit.run import run_audit

__all__ = ["AuditConfig", "run_audit"]
