"""Schemas of the configs that users write their own of: data, evaluation, predict and
preprocess.

Each schema is a dataclass registered with Hydra's ConfigStore; the YAML file names it
first in its defaults list (``defaults: [schema_phantom, _self_]``), so every key the YAML
(or a user's config extending it through ``hydra.searchpath``) sets must be a field: a
misspelt or unknown key fails at composition, naming it, before any work. Values are
type-checked at the same time (``batch_size: two`` fails). A default written here is not
repeated in the YAML.

``prior_dose`` and ``beams`` are open (``Any``): their own code checks them.

Ranges (``batch_size >= 1``, a patch size the network's down-sampling divides, a positive
learning rate, ``max_epochs >= 1``, ...) are checked by :class:`CheckConfigValues`, a
Hydra callback (``conf/hydra/default.yaml``) that runs after composition and before the
run folder is made.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING

from vmatdose.errors import InputError

#: CT Hounsfield units mapped linearly to [0, 1] (clipped) in the network input.
CT_WINDOW_HU = (-1000.0, 1500.0)
#: Signed distances (mm) are divided by this before they enter the network.
SDF_SCALE_MM = 50.0
#: The default phantom grid (Z, Y, X voxels) and voxel spacing (mm).
PHANTOM_SHAPE = (48, 64, 96)
PHANTOM_SPACING_MM = (3.0, 4.0, 4.0)


@dataclass
class SplitConfig:
    """How cases are split: a split JSON (``file``) or seeded fractions."""

    val_fraction: float = 0.125
    test_fraction: float = 0.125
    seed: int = 0
    file: str | None = None


@dataclass
class AugmentConfig:
    """Training augmentation probabilities and magnitudes (0 disables one), see
    :class:`vmatdose.data.pipeline.SamplingSettings`."""

    flip_lr: float = 0.0
    flip_ap: float = 0.0
    flip_si: float = 0.0
    rotate_deg: float = 0.0
    rotate_prob: float = 0.0
    intensity_shift: float = 0.0
    intensity_prob: float = 0.0


@dataclass
class DataConfig:
    """Keys every data config has: the arguments of
    :class:`vmatdose.data.datamodule.DoseDataModule`."""

    _target_: str = "vmatdose.data.datamodule.DoseDataModule"
    cases_dir: str | None = MISSING
    structures: list[str] = MISSING
    targets: list[str] = MISSING
    prescriptions_gy: dict[str, float] = MISSING
    dose_scale_gy: float = MISSING
    lr_pairs: list[list[str]] = field(default_factory=list)
    constraints: list[dict[str, Any]] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    split_output: str | None = None
    conditioning: str = "none"
    patch_size: list[int] | None = None
    patch_sampling: str = "uniform"
    dose_patch_fraction: float = 0.8
    batch_size: int = 2
    num_workers: int = 0
    signed_distance: bool = False
    sdf_scale_mm: float = SDF_SCALE_MM
    ct_window: list[float] = field(default_factory=lambda: list(CT_WINDOW_HU))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: bool = True
    cache_workers: int = 1
    compact: bool = False
    device_cache: bool = False
    prior_dose: Any = None
    beams: Any = None
    resolution_factor: int = 1
    divisible_by: int = 16
    max_cases: int | None = None


@dataclass
class PhantomGeneratorConfig:
    """Arguments of :func:`vmatdose.data.phantom.generate_phantom_dataset` (partial)."""

    _target_: str = "vmatdose.data.phantom.generate_phantom_dataset"
    _partial_: bool = True
    # The one folder it fills, on the phantom data config's first use (data.cases_dir
    # follows it; any other cases_dir is only read).
    output_dir: str = MISSING
    n_cases: int = MISSING
    shape: list[int] = field(default_factory=lambda: list(PHANTOM_SHAPE))
    spacing_mm: list[float] = field(default_factory=lambda: list(PHANTOM_SPACING_MM))
    seed: int = 0
    num_workers: int = 2
    protocol: Any = None
    second_level_gy: dict[str, float] | None = None
    second_level_fraction: float = 0.5


@dataclass
class PhantomDataConfig(DataConfig):
    """``data=phantom``: generated on first use when ``cases_dir`` holds no case files."""

    generator: PhantomGeneratorConfig | None = None


@dataclass
class OpenKBPDataConfig(DataConfig):
    """``data=openkbp``: :class:`vmatdose.data.openkbp.OpenKBPDataModule`."""

    _target_: str = "vmatdose.data.openkbp.OpenKBPDataModule"
    cases_dir: str | None = None
    source_dir: str | None = None
    data_dir: str = MISSING
    import_workers: int = 2
    # Phantom only: present so that a phantom-only debug mode combined with data=openkbp
    # reaches its own refusal (debug=smoke); OpenKBPDataModule refuses it when set.
    generator: Any = None


@dataclass
class GammaCriterion:
    """One gamma criterion: global dose difference (% of the reference max) and DTA (mm)."""

    dose_percent: float = MISSING
    distance_mm: float = MISSING


@dataclass
class EvaluationConfig:
    """The ``evaluation`` group (see :class:`vmatdose.evaluation.suite.EvaluationSettings`).

    gamma: criteria; the first also gets region pass rates and the gamma map figure.
    gamma_cutoff_percent: reference voxels below this % of the max are not scored.
    region_margin_mm: OAR neighbourhood margin for region gamma.
    figures: draw figures and the HTML report; figure_cases: how many cases get them.
    dpi: PNG resolution.
    """

    gamma: list[GammaCriterion] = field(default_factory=lambda: [
        GammaCriterion(3.0, 3.0), GammaCriterion(2.0, 2.0)])
    gamma_cutoff_percent: float = 10.0
    region_margin_mm: float = 10.0
    figures: bool = True
    figure_cases: int = 3
    dpi: int = 300


@dataclass
class EvalConfig:
    """``conf/eval.yaml``: the keys :mod:`vmatdose.evaluate` reads."""

    task_name: str = "eval"
    ckpt_path: str | None = None
    predictions_dir: str | None = None
    split: str = "test"
    split_file: str | None = None
    spacing_mismatch: str = "resample"
    accelerator: str = "auto"
    protocol: Any = None
    data: Any = None
    evaluation: Any = None
    paths: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictConfig:
    """``conf/predict.yaml``: the keys :mod:`vmatdose.predict` reads."""

    task_name: str = "predict"
    ckpt_path: str = MISSING
    cases_dir: str | None = None
    dicom_dir: str | None = None
    keep_cases: bool = False
    output_dir: str = MISSING
    spacing_mismatch: str = "resample"
    export_rtdose: bool = False
    source_dicom: str | None = None
    id_salt: str = ""
    case_id_map: str | None = None
    export_openkbp: bool = False
    overwrite: bool = False
    accelerator: str = "auto"
    paths: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreprocessConfig:
    """``conf/preprocess.yaml``: the keys :mod:`vmatdose.preprocess` reads."""

    task_name: str = "preprocess"
    input_dir: str | None = None
    output_dir: str = MISSING
    num_workers: int = 2
    progress: bool = True
    summary_path: str | None = None
    allow_failures: bool = False
    source: Any = None
    protocol: Any = None
    data: Any = None
    paths: dict[str, Any] = field(default_factory=dict)


#: (group, name, schema) of every registered schema; the YAML names them in its defaults.
SCHEMAS = (
    ("data", "schema_phantom", PhantomDataConfig),
    ("data", "schema_openkbp", OpenKBPDataConfig),
    ("evaluation", "schema", EvaluationConfig),
    (None, "schema_eval", EvalConfig),
    (None, "schema_predict", PredictConfig),
    (None, "schema_preprocess", PreprocessConfig),
)


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        store.store(group=group, name=name, node=node)


class ConfigValueError(InputError):
    """A config value outside its allowed range (the message names the key)."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> list[str]:
    return [] if ok else [f"{key}={value}: {allowed}"]


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def data_value_errors(data: Any, divisible_by: int | None = None) -> list[str]:
    """What is out of range in a data config; ``divisible_by``: the network's (default the
    data config's own)."""
    errors = _check(_is_int(data.get("batch_size"), 1), "data.batch_size",
                    data.get("batch_size"), "must be an integer >= 1")
    errors += _check(_is_int(data.get("num_workers", 0), 0), "data.num_workers",
                     data.get("num_workers"), "must be an integer >= 0")
    for key in ("divisible_by", "resolution_factor"):
        errors += _check(_is_int(data.get(key, 1), 1), f"data.{key}", data.get(key),
                         "must be an integer >= 1")
    fraction = data.get("dose_patch_fraction", 0.0)
    errors += _check(0.0 <= fraction <= 1.0, "data.dose_patch_fraction", fraction,
                     "must be in [0, 1]")
    patch = data.get("patch_size")
    step = divisible_by or data.get("divisible_by") or 1
    if patch is not None:
        patch = list(patch)
        good = (len(patch) == 3 and all(_is_int(p, 1) for p in patch)
                and all(p % step == 0 for p in patch))
        errors += _check(good, "data.patch_size", patch,
                         f"must be 3 positive integers divisible by {step} (the network's "
                         "down-sampling, data.divisible_by), or null for whole volumes")
    split = data.get("split") or {}
    val, test = split.get("val_fraction", 0.0), split.get("test_fraction", 0.0)
    errors += _check(0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0,
                     "data.split", f"{{val_fraction: {val}, test_fraction: {test}}}",
                     "fractions must be in [0, 1) with val_fraction + test_fraction < 1")
    return errors


def evaluation_value_errors(evaluation: Any) -> list[str]:
    """What is out of range in an evaluation config."""
    errors = []
    for i, criterion in enumerate(evaluation.get("gamma") or []):
        for key in ("dose_percent", "distance_mm"):
            value = criterion.get(key)
            errors += _check(isinstance(value, (int, float)) and value > 0,
                             f"evaluation.gamma[{i}].{key}", value, "must be > 0")
    cutoff = evaluation.get("gamma_cutoff_percent", 0.0)
    errors += _check(0.0 <= cutoff < 100.0, "evaluation.gamma_cutoff_percent", cutoff,
                     "must be in [0, 100)")
    errors += _check(evaluation.get("region_margin_mm", 0.0) >= 0.0,
                     "evaluation.region_margin_mm", evaluation.get("region_margin_mm"),
                     "must be >= 0")
    errors += _check(_is_int(evaluation.get("figure_cases", 0), 0), "evaluation.figure_cases",
                     evaluation.get("figure_cases"), "must be an integer >= 0")
    errors += _check(_is_int(evaluation.get("dpi", 1), 1), "evaluation.dpi",
                     evaluation.get("dpi"), "must be an integer >= 1")
    return errors


def training_value_errors(cfg: Any) -> list[str]:
    """What is out of range in a training run's trainer and optimizer settings."""
    errors = []
    trainer = cfg.get("trainer") or {}
    if "max_epochs" in trainer:
        epochs = trainer.get("max_epochs")
        errors += _check(_is_int(epochs, 1), "trainer.max_epochs", epochs,
                         "must be an integer >= 1 (the cosine schedule's T_max; -1, "
                         "endless training, is not supported)")
    model = cfg.get("model") or {}
    for name in [k for k in model.keys() if "optimizer" in str(k)]:  # resolve only these
        node = model.get(name)
        if hasattr(node, "get") and "lr" in node:
            lr = node.get("lr")
            errors += _check(isinstance(lr, (int, float)) and not isinstance(lr, bool)
                             and lr > 0, f"model.{name}.lr", lr, "must be > 0")
    return errors


#: Allowed values of the entry points' choice keys.
CHOICES = {"split": ("train", "val", "test", "all"),
           "spacing_mismatch": ("resample", "refuse", "training_grid")}


def value_errors(cfg: Any) -> list[str]:
    """Every out-of-range value of a composed config (each ``key=value: allowed``)."""
    errors = []
    for key, allowed in CHOICES.items():
        if key in cfg:
            errors += _check(cfg.get(key) in allowed, key, cfg.get(key),
                             f"must be one of {', '.join(allowed)}")
    if cfg.get("data") is not None:
        model = cfg.get("model") or {}
        errors += data_value_errors(cfg.data, model.get("divisible_by"))
    if cfg.get("evaluation") is not None:
        errors += evaluation_value_errors(cfg.evaluation)
    return errors + training_value_errors(cfg)


def check_values(cfg: Any) -> None:
    """Raise :class:`ConfigValueError` naming every out-of-range value of ``cfg``."""
    errors = value_errors(cfg)
    if errors:
        raise ConfigValueError("bad config value: " + "; ".join(errors))


class CheckConfigValues(Callback):
    """Hydra callback: refuse a composed config with out-of-range values before the run
    starts (before its run folder exists), with one line naming the key and the range.

    ``SystemExit`` (exit status 1), not an exception: Hydra turns a callback's exceptions
    into warnings.
    """

    def _check(self, config: Any) -> None:
        try:
            check_values(config)
        except ConfigValueError as err:
            raise SystemExit(f"error: {err}") from None

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)  # sweep jobs: each job's own values
