"""Model tests run torch on one CPU thread.

The network tests are many small convolutions; on a machine whose cores are shared with
other jobs, several OpenMP threads waiting for a busy core make them many times slower
(a 30-step DDPM run: ~5 s on one thread, 100 s on two under load).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
