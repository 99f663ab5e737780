"""A hint for command lines Hydra's override parser refuses: unquoted paths.

``output_dir=/data/my cases`` reaches Python as two words (``dir`` is then an override
without ``=``), and ``output_dir=/data/données`` stops Hydra's lexer at the first
non-ASCII character. Hydra's own message says neither; :func:`with_quoting_hint` adds one
line saying how to quote the value.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence


def quoting_hint(argv: Sequence[str]) -> str | None:
    """One line telling how to quote the first override that needs it, else ``None``."""
    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        key, eq, value = arg.partition("=")
        if eq and value and value[0] not in "'\"" and (not value.isascii() or " " in value):
            return _hint(key, value)
        if not eq and i > 0 and "=" in argv[i - 1] and not argv[i - 1].startswith("-"):
            key, _, value = argv[i - 1].partition("=")
            return _hint(key, f"{value} {arg}")
    return None


def _hint(key: str, value: str) -> str:
    return (f"hint: quote a value with spaces or non-ASCII characters for the shell and for "
            f"Hydra: '{key}=\"{value}\"'")


def with_quoting_hint(app: Callable) -> Callable:
    """Wrap a Hydra main function: when it exits with an error and the command line holds
    an unquoted path, print :func:`quoting_hint` after Hydra's message."""

    @functools.wraps(app)
    def wrapper(*args, **kwargs):
        try:
            return app(*args, **kwargs)
        except SystemExit as exit_:
            hint = quoting_hint(sys.argv[1:]) if exit_.code not in (0, None) else None
            if hint:
                print(hint, file=sys.stderr, flush=True)
            raise

    return wrapper
