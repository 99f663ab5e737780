"""Bad input, reported as one line naming the file and the problem.

Library code raises :class:`InputError` (or a subclass: a bad case file, a checkpoint that
is not a vmatdose checkpoint, a case that does not match a checkpoint); entry points wrap
their work in :func:`exit_on_input_error`, so a user sees that line as the last line of
output and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class InputError(ValueError):
    """A user-given file or setting is unusable; ``str(err)`` is one line naming it."""


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an :class:`InputError` or missing file into ``error: <message>`` on stderr
    (after everything already written to stdout) and exit status 1."""
    try:
        yield
    except (InputError, FileNotFoundError) as err:
        sys.stdout.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
