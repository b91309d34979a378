"""Secrets never reach logs, configs or model cards: values of secret-looking environment
variables (names containing TOKEN, KEY, SECRET or PASSWORD) are replaced by '***'.

Only values that are secrets: at least 8 characters, and not something else the run names anyway (a path
that exists, such as a model directory kept in a variable called ``..._KEY``): redacting those would corrupt
the saved config (``name_or_path: ***``) and the documented resume. In YAML the replacement is made on the
values, so the file stays valid YAML ('***' quoted, not an alias).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _is_secret(value: str) -> bool:
    if len(value) < 8:
        return False
    try:
        return not os.path.exists(value)
    except (OSError, ValueError):  # a value that cannot be a path (NUL, too long) is not a path
        return True


def secret_values() -> list[str]:
    """Values worth hiding: from secret-looking variable names, at least 8 characters long, not existing paths."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and _is_secret(v)}, key=len,
                  reverse=True)


def redact_values(obj: Any) -> Any:
    """``redact`` on every string inside a (nested) dict or list."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_values(v) for v in obj]
    return obj


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "***")
    return text


class RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
