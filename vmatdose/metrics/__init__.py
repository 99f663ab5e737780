"""Clinical evaluation metrics: gamma index and dose-volume histogram (DVH) metrics."""

from vmatdose.metrics.dvh import (
    DVHMetric,
    cumulative_dvh,
    dose_at_cc,
    dose_at_volume,
    dvh_metrics,
    evaluate_dvh_metric,
    max_dose,
    mean_dose,
    min_dose,
    parse_dvh_metric,
    volume_at_dose,
    volume_at_relative_dose,
)
from vmatdose.metrics.gamma import gamma_index, gamma_pass_rate, pass_rate_from_gamma

__all__ = [
    "DVHMetric",
    "cumulative_dvh",
    "dose_at_cc",
    "dose_at_volume",
    "dvh_metrics",
    "evaluate_dvh_metric",
    "gamma_index",
    "gamma_pass_rate",
    "max_dose",
    "mean_dose",
    "min_dose",
    "parse_dvh_metric",
    "pass_rate_from_gamma",
    "volume_at_dose",
    "volume_at_relative_dose",
]
