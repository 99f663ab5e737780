"""Guards of the debug modes (``conf/debug/``): a mode that brings its own data refuses a
command line that asks for other data, instead of silently training on the wrong set.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RequireDataChoice(Callback):
    """A Hydra callback refusing (exit status 1, one message) a run whose ``data`` group
    choice is not ``data``.

    Args:
        mode: the debug mode, for the message (``smoke``).
        data: the only data choice the mode works with (``phantom``).
    """

    def __init__(self, mode: str, data: str):
        self.mode, self.data = mode, data

    def check(self, config: DictConfig) -> None:
        chosen = config.hydra.runtime.choices.get("data")
        if chosen != self.data:
            # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings
            raise SystemExit(
                f"debug={self.mode} trains on its own tiny {self.data} cases and cannot be "
                f"combined with data={chosen}; for a quick run on data={chosen} use "
                f"debug=fdr (one batch), debug=limit (a few batches, 2 epochs) or "
                f"debug=overfit (one batch, repeated)")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config)
