"""Logging set-up: JSON lines or plain text on standard error."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else came from `extra=` and is
# written as its own JSON field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _FieldFilter(logging.Filter):
    def __init__(self, name: str, value: object) -> None:
        super().__init__()
        self.field_name, self.value = name, value

    def filter(self, record: logging.LogRecord) -> bool:
        setattr(record, self.field_name, self.value)
        return True


def add_log_field(name: str, value: object) -> None:
    """Add a field to every log record of this process, such as a worker number."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FieldFilter(name, value))
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(
                logging.Formatter(
                    f"%(asctime)s %(levelname)s %(name)s [{name} {value}]: %(message)s"
                )
            )


def configure_logging(level: str, format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # urllib3 logs every connection at debug, with full URLs; keep it at warning.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
