"""The one exception of bad input, and how entry points turn it into one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ConfigError", "exit_on_config_error", "root_cause"]


class ConfigError(Exception):
    """Bad input found at start-up; the message names the key, file or value."""


def root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@contextmanager
def exit_on_config_error(log: logging.Logger) -> Iterator[None]:
    """For entry points: a :class:`ConfigError` becomes one line on stderr and exit code 2
    (messages of several lines, as OmegaConf's with their ``full_key:`` detail, are joined)."""
    try:
        yield
    except ConfigError as err:
        line = "; ".join(part.strip() for part in str(err).splitlines() if part.strip())
        log.error("%s", line)
        print(f"medrobust: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
