"""The shared plot style: importing the figure modules keeps the user's matplotlib
backend; the entry points' ``use_file_backend`` selects Agg."""

import importlib
import sys

import matplotlib
import pytest

FIGURE_MODULES = ("vmatdose.plot_style", "vmatdose.evaluation.figures",
                  "vmatdose.tracking.images", "vmatdose.planning.comparison",
                  "vmatdose.planning.fluence", "vmatdose.analysis.study")


@pytest.fixture
def svg_backend():
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(previous)


def test_importing_the_figure_modules_keeps_the_users_backend(svg_backend, monkeypatch):
    for name in FIGURE_MODULES:  # a fresh import; the modules other tests hold come back
        parent, _, child = name.rpartition(".")
        original = importlib.import_module(name)
        monkeypatch.setattr(importlib.import_module(parent), child, original)
        monkeypatch.delitem(sys.modules, name)
    for name in FIGURE_MODULES:
        importlib.import_module(name)
        assert matplotlib.get_backend() == "svg", name


def test_the_entry_points_backend_is_agg(svg_backend):
    from vmatdose.plot_style import use_file_backend

    use_file_backend()
    assert matplotlib.get_backend().lower() == "agg"
