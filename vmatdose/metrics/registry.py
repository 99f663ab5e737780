"""One registry of metric facts: what each logged or tabulated metric is called for a
reader, its unit and which direction is better; the headline metric lists; the scoring
regions' constants that region-gamma labels are built from; and which overrides are not
an experimental choice. The report, ``compare``, the study and anatomy analyses and the
train summary line all read it, so a metric is named the same everywhere.

Names are those of ``per_case.csv`` / ``summary.json`` (``mae_body_gy``,
``gamma_3pct_3mm_targets_pass``, ``d95_PTV70_error_gy``...), optionally prefixed by the
logger's stage (``test/``, ``val/``, ``train/``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: ``direction`` values: lower or higher is better, nearer zero is better (signed
#: errors), or neither (reference values, descriptive numbers).
DIRECTIONS = ("lower", "higher", "zero", "none")
_STAGES = {"test": "test", "val": "validation", "train": "training"}


@dataclass(frozen=True)
class Metric:
    """A metric as a reader sees it.

    Attributes:
        name: the machine name, e.g. ``test/mae_body_gy``.
        label: readable name, e.g. ``MAE in body``.
        unit: ``Gy``, ``%`` or ``""``.
        direction: one of :data:`DIRECTIONS`.
    """

    name: str
    label: str
    unit: str
    direction: str

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "higher"

    @property
    def heading(self) -> str:
        """``label (unit)``, e.g. ``MAE in body (Gy)``."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def format(self, value: float | None, digits: int = 2) -> str:
        """``value`` with its unit (``17.48 Gy``, ``92.7 %``); empty for a missing value."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        digits = 1 if self.unit == "%" else digits
        return f"{value:.{digits}f} {self.unit}".rstrip()


#: Scoring regions of region gamma (:mod:`vmatdose.evaluation.regions`): ``ptv_region`` is
#: the targets grown by this margin (mm); ``high_dose`` is the reference dose above
#: ``HIGH_DOSE_FRACTION`` of the case's highest prescription, ``low_dose`` from
#: ``LOW_DOSE_FRACTION`` up to it.
PTV_MARGIN_MM = 5.0
HIGH_DOSE_FRACTION = 0.5
LOW_DOSE_FRACTION = 0.1

#: Uncertainty calibration (:mod:`vmatdose.evaluation.uncertainty`): the ensemble's 95 %
#: interval is ``mean +- INTERVAL_Z * std`` (Gaussian); the regions its coverage and
#: spread-error correlation are reported in (``body`` without a name suffix).
INTERVAL_Z = 1.959964
UNCERTAINTY_REGIONS = ("body", "targets", "oars", "low_dose")
_UNCERTAINTY_REGION_LABELS = {"targets": "targets", "oars": "organs at risk",
                              "low_dose": f"{100 * LOW_DOSE_FRACTION:g}-"
                              f"{100 * HIGH_DOSE_FRACTION:g} % of Rx"}
#: The per-case uncertainty columns the report shows beside the headline ones (a model
#: that returns a spread).
UNCERTAINTY = ("uncertainty_mean_std_gy", "uncertainty_error_correlation",
               "uncertainty_coverage95", "uncertainty_coverage95_targets",
               "uncertainty_coverage95_oars", "uncertainty_coverage95_low_dose")

#: The headline metrics (``per_case.csv`` / ``summary.json`` names), in reading order: the
#: report's summary and per-case table, and the columns ``compare`` shows per run.
HEADLINE = ("mae_body_gy", "baseline_mae_body_gy", "gamma_3pct_3mm_pass",
            "gamma_3pct_3mm_targets_pass", "gamma_2pct_2mm_pass", "openkbp_dose_score_gy")
#: The error columns the anatomy analysis correlates (plus ``d95_<target>_abs_error_gy``).
ANATOMY_ERRORS = ("mae_body_gy", "gamma_3pct_3mm_pass", "gamma_3pct_3mm_ptv_region_pass")


def study_metrics(target: str | None) -> tuple[str, ...]:
    """The metrics a study reports when none are named, in this order; ``target`` (the
    protocol's first, highest-dose target) adds its D95 errors, ``None`` leaves them out."""
    d95 = (f"d95_{target}_error_gy", f"d95_{target}_abs_error_gy") if target else ()
    return ("openkbp_dose_score_gy", "openkbp_dvh_score_gy", "mae_body_gy",
            "gamma_3pct_3mm_pass", "gamma_3pct_3mm_targets_pass",
            "gamma_3pct_3mm_low_dose_pass", "gamma_3pct_3mm_high_dose_pass",
            "gamma_3pct_3mm_ptv_region_pass", *d95)


#: Config keys and override keys that say where or how a run is recorded, not what it is:
#: no experimental choice (run names, compare's columns and a study's recipes skip them).
NOT_EXPERIMENTAL = ("paths.", "hydra.", "hydra/", "logger", "task_name", "tags", "ckpt_path",
                    "data.split_output", "callbacks.model_checkpoint.dirpath",
                    "trainer.default_root_dir", "callbacks.training_curves.output_dir",
                    "callbacks.throughput.output_dir")


def is_experimental(key_or_override: str) -> bool:
    """Whether a config key or a command-line override (``+``/``~`` prefixes, ``=value``
    allowed) is an experimental choice, i.e. not in :data:`NOT_EXPERIMENTAL`."""
    key = key_or_override.lstrip("+~").split("=", 1)[0]
    return not key.startswith(NOT_EXPERIMENTAL)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


_GAMMA = r"gamma_(?P<dose>[\d.]+)pct_(?P<mm>[\d.]+)mm"
# (pattern, label template, unit, direction); the first full match wins.
_PATTERNS: list[tuple[str, str, str, str]] = [
    (r"mae_body_gy", "MAE in body", "Gy", "lower"),
    (r"baseline_mae_body_gy", "mean-dose baseline MAE in body", "Gy", "lower"),
    # val/mae_gy: the validation loop's MAE, inside the body like mae_body_gy
    (r"mae_gy", "MAE in body", "Gy", "lower"),
    (r"mae_gy_best", "best MAE in body", "Gy", "lower"),
    (r"mae_(?P<s>.+)_gy", "MAE in {s}", "Gy", "lower"),
    (r"(?P<m>d\d+|dmean|dmax)_(?P<s>.+)_abs_error_gy", "{s} {M} absolute error", "Gy",
     "lower"),
    (r"(?P<m>d\d+|dmean|dmax)_(?P<s>.+)_error_gy", "{s} {M} error (prediction - reference)",
     "Gy", "zero"),
    (r"(?P<m>d\d+|dmean|dmax)_(?P<s>.+)_ref_gy", "{s} {M}, reference", "Gy", "none"),
    (r"(?P<m>d\d+|dmean|dmax)_(?P<s>.+)_pred_gy", "{s} {M}, prediction", "Gy", "none"),
    (_GAMMA + r"_pass", "gamma {dose}%/{mm} mm pass rate", "%", "higher"),
    (_GAMMA + r"_targets_pass", "gamma {dose}%/{mm} mm pass rate in targets", "%", "higher"),
    (_GAMMA + r"_ptv_region_pass",
     f"gamma {{dose}}%/{{mm}} mm pass rate in targets + {PTV_MARGIN_MM:g} mm", "%", "higher"),
    (_GAMMA + r"_high_dose_pass",
     f"gamma {{dose}}%/{{mm}} mm pass rate above {_percent(HIGH_DOSE_FRACTION)} of Rx", "%",
     "higher"),
    (_GAMMA + r"_low_dose_pass", f"gamma {{dose}}%/{{mm}} mm pass rate at "
     f"{100 * LOW_DOSE_FRACTION:g}-{_percent(HIGH_DOSE_FRACTION)} of Rx", "%", "higher"),
    (_GAMMA + r"_remainder_pass", "gamma {dose}%/{mm} mm pass rate elsewhere", "%",
     "higher"),
    (_GAMMA + r"_oar_(?P<s>.+)_pass", "gamma {dose}%/{mm} mm pass rate near {s}", "%",
     "higher"),
    (r"gamma_pass", "gamma pass rate", "%", "higher"),
    (r"gamma_points", "gamma evaluated voxels", "", "none"),
    (r"openkbp_dose_score_gy", "OpenKBP dose score", "Gy", "lower"),
    (r"openkbp_dvh_score_gy", "OpenKBP DVH score", "Gy", "lower"),
    (r"openkbp_dvh_score_gy", "OpenKBP DVH score", "Gy", "lower"),
    (r"uncertainty_mean_std_gy", "mean ensemble std in body", "Gy", "none"),
    (r"uncertainty_error_correlation", "ensemble std - error correlation", "", "higher"),
    (r"uncertainty_error_correlation_(?P<s>targets|oars|low_dose)",
     "ensemble std - error correlation in {s}", "", "higher"),
    (r"uncertainty_coverage95", "reference inside the ensemble's 95 % interval", "%",
     "none"),
    (r"uncertainty_coverage95_(?P<s>targets|oars|low_dose)",
     "reference inside the ensemble's 95 % interval in {s}", "%", "none"),
    (r"loss(?:_epoch|_step)?", "loss", "", "lower"),
    (r"loss/(?P<s>[^_]+)(?:_epoch|_step)?", "loss term {s}", "", "lower"),
]
_COMPILED = [(re.compile(p), label, unit, d) for p, label, unit, d in _PATTERNS]


def metric(name: str) -> Metric | None:
    """The registry entry of ``name`` (``test/``, ``val/``, ``train/`` prefixes allowed),
    ``None`` when the name is not a known metric."""
    head, sep, rest = name.partition("/")
    stage, bare = (head, rest) if sep and head in _STAGES else ("", name)
    for pattern, label, unit, direction in _COMPILED:
        match = pattern.fullmatch(bare)
        if match:
            groups = {k: v for k, v in match.groupdict().items() if v is not None}
            if "m" in groups:
                groups["M"] = groups["m"].upper() if groups["m"][0] == "d" and \
                    groups["m"][1:].isdigit() else groups["m"].capitalize()
            if bare.startswith("uncertainty_") and "s" in groups:
                groups["s"] = _UNCERTAINTY_REGION_LABELS[groups["s"]]
            text = label.format(**groups)
            if stage and stage != "test":
                text = f"{_STAGES[stage]} {text}"
            return Metric(name, text, unit, direction)
    return None


def label(name: str) -> str:
    """The readable name of a metric (the name itself when it is not in the registry)."""
    entry = metric(name)
    return entry.label if entry else name


def heading(name: str) -> str:
    """``label (unit)`` of a metric, the name itself when unknown."""
    entry = metric(name)
    return entry.heading if entry else name


def higher_is_better(name: str) -> bool:
    """Whether larger values of ``name`` are better (unknown names: no)."""
    entry = metric(name)
    return bool(entry and entry.higher_is_better)


def summary_line(task_name: str, means: dict[str, float], primary_target: str,
                 seconds: float) -> str:
    """The one line a training run ends with, from metric means (``mae_body_gy`` ...):
    ``<task>: test MAE x Gy (mean-dose baseline y Gy), PTV70 D95 error z Gy, t s``."""
    nan = float("nan")
    mae = means.get("mae_body_gy", nan)
    baseline = means.get("baseline_mae_body_gy", nan)
    d95 = means.get(f"d95_{primary_target}_abs_error_gy", nan)
    unit = metric("mae_body_gy").unit
    return (f"{task_name}: test MAE {mae:.2f} {unit} (mean-dose baseline {baseline:.2f} "
            f"{unit}), {primary_target} D95 error {d95:.2f} {unit}, {seconds:.0f} s")
