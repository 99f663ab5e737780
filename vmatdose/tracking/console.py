"""A quiet console: one line per fact, third-party chatter filtered.

Hydra configures logging before the task function runs; :func:`setup_console` (first
line of each entry point's ``main``) then silences, precisely:

* ``alembic`` INFO lines (optuna imports alembic when MONAI loads its optional modules);
* Lightning's litlogger advertisement and its TPU line on a machine without TPUs;
* the ``LeafSpec`` deprecation warning Lightning's pytree helper triggers in torch.

Our own INFO lines, Lightning's GPU and seed facts, and every warning not listed stay.
"""

from __future__ import annotations

import logging
import warnings

QUIET_LOGGERS = ("alembic",)
#: Lightning's rank-zero loggers and the message starts dropped from them.
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero")
DROPPED_MESSAGES = ("💡 Tip: For seamless cloud logging", "TPU available: False")
IGNORED_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] = DROPPED_MESSAGES):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def setup_console() -> None:
    """Filter the known third-party noise (idempotent)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages())
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
