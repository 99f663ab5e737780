"""The planning engine (pyRadPlan) as an optional extra.

pyRadPlan pulls about 1.2 GB of packages (pydantic-ai and its clients among them) and
needs ``pydantic==2.11.*`` (with 2.12+ its photon dose calculation fails while
serialising beamlets), so it is not a core dependency: ``pip install -e ".[plan]"``.
"""

from __future__ import annotations

from types import ModuleType

from vmatdose.errors import InputError

INSTALL_COMMAND = 'pip install -e ".[plan]"'
ENGINE_PIN = "pyradplan==0.5.0 with pydantic==2.11.*"


class PlanningEngineMissing(InputError):
    """pyRadPlan is not installed (or cannot be imported)."""


def require_pyradplan() -> ModuleType:
    """The imported ``pyRadPlan`` package; :class:`PlanningEngineMissing` naming the install
    command when it is absent or broken."""
    try:
        import pyRadPlan
    except ImportError as err:
        raise PlanningEngineMissing(
            f"python -m vmatdose.plan needs the planning engine pyRadPlan, which is not "
            f"installed ({err}); install the optional extra with: {INSTALL_COMMAND} "
            f"({ENGINE_PIN}; about 1.2 GB, best in its own virtual environment)") from err
    return pyRadPlan
