"""Secrets never reach logs, configs or model cards: values of secret-looking environment
variables (names containing TOKEN, KEY, SECRET or PASSWORD) are replaced by '***'."""

from __future__ import annotations

import logging
import os
import re

_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values worth hiding: from secret-looking variable names, at least 8 characters long."""
    return sorted({v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}, key=len,
                  reverse=True)


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
