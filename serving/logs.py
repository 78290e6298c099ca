"""Log lines of `pcee-serve`: every line timestamped; `text` for people, `json` (one object per line) for collectors."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; whatever else a record carries came from `extra=` and is kept in JSON.
STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "pcee.serving", "pcee.serving.access")


class TimestampedFormatter(logging.Formatter):
    """ISO 8601 times in UTC with milliseconds: `2026-12-06T07:21:21.123Z`."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(TimestampedFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in STANDARD_ATTRIBUTES})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def logging_config(level: str, log_format: str, access_log: bool) -> dict:
    """A `logging.config.dictConfig` for uvicorn's and the server's loggers (uvicorn's own access log stays off:
    `pcee.serving.access` writes one line per request, with its X-Request-ID)."""
    formatter = (
        {"()": JsonFormatter} if log_format == "json" else {"()": TimestampedFormatter, "fmt": TEXT_FORMAT}
    )
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"server": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "server", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
            "pcee.serving": {"handlers": ["stderr"], "level": level, "propagate": False},
            "pcee.serving.access": {"level": "INFO" if access_log else "CRITICAL"},
        },
    }
