"""The engine's matrix in the layout the optimisers use, and the per-stage clock."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from vmatdose.planning.optimise import StageClock, product_matrix


def test_product_matrix_is_csr_float32_with_the_engines_products():
    rng = np.random.default_rng(0)
    engine = sp.random_array((500, 40), density=0.1, format="csc", dtype=np.float32, rng=rng)
    matrix = product_matrix(engine)
    assert matrix.format == "csr" and matrix.dtype == np.float32
    assert matrix.nnz == engine.nnz
    w = rng.uniform(0, 2, 40).astype(np.float32)
    g = rng.uniform(-1, 1, 500).astype(np.float32)
    np.testing.assert_allclose(matrix @ w, engine @ w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(matrix.T @ g, engine.T @ g, rtol=1e-5, atol=1e-5)


def test_stage_clock_counts_each_stage_inside_the_total():
    clock = StageClock()
    with clock.stage("first"):
        np.linalg.svd(np.random.default_rng(1).random((200, 200)))
    with clock.stage("second"):
        pass
    clock.finish()
    assert set(clock.seconds) == set(clock.cpu_seconds) == {"first", "second", "total"}
    assert all(v >= 0 for v in clock.cpu_seconds.values())
    assert clock.cpu_seconds["total"] >= clock.cpu_seconds["first"] + clock.cpu_seconds["second"]
    assert clock.seconds["total"] >= clock.seconds["first"] + clock.seconds["second"]
