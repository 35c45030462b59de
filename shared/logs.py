"""Structured logging: one canonical JSON line per request, every value passed through redaction.

Field names are constants so the log, the problem documents and any counters agree.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from shared.cards import redact_pans

REQUEST_ID = "request_id"
FUNCTION = "function"
METHOD = "method"
ROUTE = "route"
STATUS = "status"
LATENCY_MS = "latency_ms"
ORG_ID = "org_id"
DECISION_REASON = "decision_reason"

REDACTED = "[redacted]"

# Credential shapes we issue or hold: widget keys, bearer tokens, provider tokens and webhook URLs.
_SECRET_PATTERNS = [
    re.compile(r"hh_wk_[A-Za-z0-9_]+"),
    re.compile(r"hh_vt_[A-Za-z0-9._\-]+"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._\-~+/]+=*"),
    re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]+"),
    re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]+"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]+"),
    re.compile(r"\b(?:secret|ntn)_[A-Za-z0-9]{20,}"),
    re.compile(r"https://hooks\.slack\.com/\S+"),
    re.compile(r"https://(?:\w+\.)?discord(?:app)?\.com/api/webhooks/\S+"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),
]
_SECRET_KEYS = re.compile(r"(?i)(secret|token|password|authorization|api_key|apikey|credential|cookie)")

_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Redact this exact value wherever it appears (settings secrets, decrypted credentials)."""
    if len(value) >= 8:
        _known_secrets.add(value)


def redact(value: Any, key: str | None = None) -> Any:
    if key is not None and _SECRET_KEYS.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        for secret in _known_secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern in _SECRET_PATTERNS:
            value = pattern.sub(REDACTED, value)
        # Card data never reaches a log either, whatever field it strayed into.
        return redact_pans(value)
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: tracebacks can carry SQL text and values.
            line["error_type"] = record.exc_info[0].__name__
        return json.dumps(redact(line), default=str, separators=(",", ":"))


def get_logger(name: str = "hiredhands") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        # At INFO, httpx logs full request URLs, and a Slack or Discord webhook's path is its credential.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
    return logger


def log_event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    get_logger().log(level, message, extra={"fields": fields})
