"""The audit log: one writer for server paths, and the export."""

from shared.audit.log import record

__all__ = ["record"]
