"""Schemas of the configs that users write their own of: data, evaluation, predict,
preprocess and plan; and the key check of the nodes without a schema (model, loss,
trainer, callbacks: their target's arguments).

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

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
    """How cases are split: a split JSON (``file``) or seeded fractions; ``train_on``: the
    splits whose cases train the model (``[train, val]`` trains the final model on every
    labelled case too, and its validation is then in-sample)."""

    val_fraction: float = 0.125
    test_fraction: float = 0.125
    seed: int = 0
    file: str | None = None
    train_on: list[str] = field(default_factory=lambda: ["train"])


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
    pool_grids: int = 1


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
    cache_budget_gb: float | None = None
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
class ClinicDataConfig(DataConfig):
    """``data=clinic``: one's own case files (``cases_dir`` required, only read)."""


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
    max_cases: evaluate only the first this many cases of the split (the debug modes'
    quick look, as Lightning's ``limit_*_batches`` for validation); null: every case.
    """

    gamma: list[GammaCriterion] = field(default_factory=lambda: [
        GammaCriterion(3.0, 3.0), GammaCriterion(2.0, 2.0)])
    gamma_cutoff_percent: float = 10.0
    region_margin_mm: float = 10.0
    figures: bool = True
    figure_cases: int = 3
    dpi: int = 300
    max_cases: int | None = None


@dataclass
class EvalConfig:
    """``conf/eval.yaml``: the keys :mod:`vmatdose.evaluate` reads."""

    task_name: str = "eval"
    ckpt_path: str | None = None
    predictions_dir: str | None = None
    split: str = "test"
    split_file: str | None = None
    spacing_mismatch: str = "resample"
    target_dose_floor: float | None = None
    oar_dose_ceiling: float | None = None
    oar_dose_scale: Any = None  # a fraction, or {organ: fraction}
    target_dose_stretch: float | None = None
    tta_pool_grids: int | None = None
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
    rtdose_grid_mm: float | None = 2.5
    source_dicom: str | None = None
    id_salt: str = ""
    case_id_map: str | None = None
    export_openkbp: bool = False
    overwrite: bool = False
    target_dose_floor: float | None = None
    oar_dose_ceiling: float | None = None
    oar_dose_scale: Any = None  # a fraction, or {organ: fraction}
    target_dose_stretch: float | None = None
    tta_pool_grids: int | None = None
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


@dataclass
class PlanningConfig:
    """``planning`` of ``conf/plan.yaml``: :class:`vmatdose.planning.settings.PlanSettings`
    (what each key means, its checks) takes these defaults."""

    dose_grid_mm: float | None = 5.0
    bixel_width_mm: float = 5.0
    sparsity_cutoff: float = 0.01
    lateral_cutoff_mm: float = 50.0
    max_iter: int = 100
    target_weight: float = 100.0
    oar_weight: float = 10.0
    body_weight: float = 1.0
    constraint_weight: float = 100.0
    criteria_weight: float = 1000.0
    criteria_margin: float = 0.02
    criteria_max_iter: int = 100
    segment_max_iter: int = 50
    smoothing_weight: float = 10.0
    leaf_width_mm: float = 5.0
    intensity_levels: int = 10
    max_segments_per_beam: int = 15
    min_segment_mu: float = 2.0
    min_segment_bixels: int = 2
    mu_per_weight: float = 100.0
    normalisation: str = "d95"
    normalisation_percent: float = 97.0
    memory_limit_gb: float = 16.0
    progress: bool = True


@dataclass
class PlanGammaConfig:
    """Gamma of the deliverable dose against the prediction (global, within the body)."""

    dose_percent: float = 3.0
    distance_mm: float = 3.0
    cutoff_percent: float = 10.0


@dataclass
class PlanConfig:
    """``conf/plan.yaml``: the keys :mod:`vmatdose.plan` reads.

    cases_dir, output_dir: required; predictions_dir (``<case_id>.npz`` as ``predict``
    writes them) or ckpt_path (predict first, into ``output_dir/predictions``);
    export_rtdose: each deliverable dose also as a DICOM RTDOSE; source_dicom, id_salt,
    case_id_map: as for ``predict`` (the RTDOSE's patient identity and UIDs).
    """

    task_name: str = "plan"
    cases_dir: str = MISSING
    predictions_dir: str | None = None
    ckpt_path: str | None = None
    accelerator: str = "auto"
    spacing_mismatch: str = "resample"
    output_dir: str = MISSING
    export_rtdose: bool = True
    source_dicom: str | None = None
    id_salt: str = ""
    case_id_map: str | None = None
    planning: PlanningConfig = field(default_factory=PlanningConfig)
    gamma: PlanGammaConfig = field(default_factory=PlanGammaConfig)
    protocol: Any = None
    paths: dict[str, Any] = field(default_factory=dict)


#: (group, name, schema) of every registered schema; the YAML names them in its defaults.
SCHEMAS = (
    ("data", "schema_phantom", PhantomDataConfig),
    ("data", "schema_openkbp", OpenKBPDataConfig),
    ("data", "schema_clinic", ClinicDataConfig),
    ("evaluation", "schema", EvaluationConfig),
    (None, "schema_eval", EvalConfig),
    (None, "schema_predict", PredictConfig),
    (None, "schema_preprocess", PreprocessConfig),
    (None, "schema_plan", PlanConfig),
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


def _is_missing(node: Any, key: str) -> bool:
    """Whether ``node[key]`` is ``???`` (``in`` is false for such a key)."""
    if not isinstance(node, DictConfig):
        return False
    try:
        return OmegaConf.is_missing(node, key)
    except Exception:  # no such key
        return False


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
    if _is_missing(data, "cases_dir"):
        errors += ["data.cases_dir=???: give the folder of your case files "
                   "(data.cases_dir=<dir>)"]
    split = data.get("split") or {}
    val, test = split.get("val_fraction", 0.0), split.get("test_fraction", 0.0)
    errors += _check(0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0,
                     "data.split", f"{{val_fraction: {val}, test_fraction: {test}}}",
                     "fractions must be in [0, 1) with val_fraction + test_fraction < 1")
    train_on = list(split.get("train_on") or ["train"])
    errors += _check("train" in train_on and set(train_on) <= {"train", "val", "test"}
                     and len(set(train_on)) == len(train_on), "data.split.train_on",
                     train_on, "must list train and any of val, test, each once")
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
    max_cases = evaluation.get("max_cases")
    errors += _check(max_cases is None or _is_int(max_cases, 1), "evaluation.max_cases",
                     max_cases, "must be an integer >= 1, or null for every case")
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


# --- keys of the nodes without a schema: their target's arguments ----------------------

#: Hydra's own keys of an instantiated node.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
#: Config groups whose nodes (and every node with a ``_target_`` inside them) may only
#: hold arguments of their target: the model (its network, optimizer, scheduler, ...), the
#: loss (its terms), the trainer and the callbacks.
TARGET_CHECKED = ("model", "loss", "trainer", "callbacks")


def target_parameters(target: str) -> dict[str, Any] | None:
    """The keyword parameters (name -> ``inspect.Parameter``) ``target`` (a Hydra
    ``_target_``) accepts: its own and, through ``**kwargs``, those of the base classes it
    passes them to (a subclass's default first); ``None`` when it takes any keyword (or
    cannot be located: instantiation reports that)."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - instantiation names a target it cannot find
        return None
    callables = ([c.__init__ for c in obj.__mro__ if "__init__" in vars(c)]
                 if inspect.isclass(obj) else [obj])
    found: dict[str, Any] = {}
    for fn in callables:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self":
                found.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return found
        if not _passes_kwargs_up(fn):  # **kwargs kept for something else: any key goes
            return None
    return None


def target_arguments(target: str) -> frozenset[str] | None:
    """The names of :func:`target_parameters` (``None``: any keyword goes)."""
    params = target_parameters(target)
    return None if params is None else frozenset(params)


def _passes_kwargs_up(fn: Any) -> bool:
    """Whether ``fn`` (an ``__init__``) hands its ``**kwargs`` to ``super().__init__``."""
    import inspect
    import re

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return re.search(r"super\(\)\.__init__\([^)]*\*\*kwargs", source) is not None


def _unknown_key(where: str, key: str, target: str, accepted: frozenset[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where}.{key}: unknown key, not an argument of {target}{hint}"


def unknown_key_errors(node: Any, where: str) -> list[str]:
    """Keys of ``node`` and of the nodes with a ``_target_`` below it that are no argument
    of their target (a misspelt ``model.chanels``), each ``key: ...``. Values are not
    resolved."""
    from omegaconf import DictConfig, ListConfig

    errors = []
    if isinstance(node, DictConfig):
        target = str(node._get_node("_target_")._value()) if "_target_" in node else None
        accepted = target_arguments(target) if target is not None else None
        for key in node.keys():
            if accepted is not None and key not in accepted and key not in HYDRA_KEYS:
                errors.append(_unknown_key(where, str(key), target, accepted))
            errors += unknown_key_errors(node._get_node(key), f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            errors += unknown_key_errors(node._get_node(i), f"{where}[{i}]")
    return errors


def resolution_errors(cfg: Any) -> list[str]:
    """The network must work on the grid the data is pooled to: ``model.resolution_factor``
    follows ``data.resolution_factor`` (the one key to set)."""
    data, model = cfg.get("data"), cfg.get("model")
    if data is None or model is None or "resolution_factor" not in model:
        return []
    data_f, model_f = data.get("resolution_factor", 1), model.get("resolution_factor")
    return _check(model_f == data_f, "model.resolution_factor", model_f,
                  f"must equal data.resolution_factor={data_f} (the data is pooled by it "
                  "and the predictor pools by the model's: set data.resolution_factor, "
                  "the model follows it)")


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
    errors += dose_bound_errors(cfg) + body_crop_errors(cfg) + tta_pool_grids_errors(cfg)
    for group in TARGET_CHECKED:
        if cfg.get(group) is not None:
            errors += unknown_key_errors(cfg._get_node(group), group)
    return errors + training_value_errors(cfg) + resolution_errors(cfg)


#: The Predictor's bounds on a prediction (``model.<name>``; ``predict`` / ``evaluate``
#: ``<name>=`` replace a checkpoint's) and what each is a fraction of.
DOSE_BOUNDS = {"target_dose_floor": "the prescription",
               "oar_dose_ceiling": "the organs' maximum-dose limits",
               "oar_dose_scale": "the organs' predicted dose",
               "target_dose_stretch": "the targets' predicted dose above the prescription"}
#: The largest dose bound (a fraction) accepted.
DOSE_FRACTION_MAX = 1.2
#: The bounds that also take one fraction per organ (a mapping organ -> fraction; organs not
#: named keep their dose).
PER_ORGAN_BOUNDS = ("oar_dose_scale",)


def is_dose_fraction(fraction: object) -> bool:
    """Whether ``fraction`` is ``None`` or a number in (0, :data:`DOSE_FRACTION_MAX`]."""
    return fraction is None or (isinstance(fraction, (int, float))
                                and not isinstance(fraction, bool)
                                and 0.0 < fraction <= DOSE_FRACTION_MAX)


def is_dose_bound(name: str, value: object) -> bool:
    """Whether ``value`` is a valid bound ``name``: :func:`is_dose_fraction`, or for the
    :data:`PER_ORGAN_BOUNDS` a non-empty mapping of organ names to fractions."""
    if name in PER_ORGAN_BOUNDS and isinstance(value, Mapping):
        return bool(value) and all(isinstance(k, str) and v is not None and is_dose_fraction(v)
                                   for k, v in value.items())
    return is_dose_fraction(value)


def _dose_bound_problem(name: str) -> str:
    per_organ = " (one, or one per organ: {organ: fraction})" if name in PER_ORGAN_BOUNDS \
        else ""
    return f"must be a fraction of {DOSE_BOUNDS[name]} in (0, {DOSE_FRACTION_MAX}]{per_organ}"


def check_dose_bound(name: str, value: object, key: str | None = None
                     ) -> float | dict[str, float] | None:
    """``value`` for the bound ``name`` (a key of :data:`DOSE_BOUNDS`) as a float in
    (0, 1.2] (or, for the :data:`PER_ORGAN_BOUNDS`, a dict organ -> such a float), or
    ``None``; ``ValueError`` naming ``key`` (default ``model.<name>``) otherwise."""
    if not is_dose_bound(name, value):
        raise ValueError(f"{key or 'model.' + name} {_dose_bound_problem(name)} or null, "
                         f"got {value!r}")
    if isinstance(value, Mapping):
        return {str(organ): float(fraction) for organ, fraction in value.items()}
    return None if value is None else float(value)


def unknown_organ_problem(name: str, value: object, organs: Sequence[str]) -> str | None:
    """For a per-organ bound ``value``, the organs it names that are not among ``organs``
    (the protocol's organs at risk); ``None`` when there are none."""
    if not isinstance(value, Mapping):
        return None
    unknown = [str(o) for o in value if o not in organs]
    return (f"{', '.join(unknown)}: not an organ at risk of the protocol ({', '.join(organs)})"
            if unknown else None)


def dose_bound_errors(cfg: Any) -> list[str]:
    """The dose bounds (predict, evaluate) and their ``model.`` keys (train) out of range."""
    model = cfg.get("model") or {}
    errors = []
    for name in DOSE_BOUNDS:
        for key, node in ((name, cfg), (f"model.{name}", model)):
            if hasattr(node, "get") and name in node:
                value = node.get(name)
                if not is_dose_bound(name, value):
                    errors.append(f"{key}={value}: {_dose_bound_problem(name)}, or null")
                elif node is model and (cfg.get("protocol") or {}).get("oars"):
                    # predict / evaluate: the checkpoint's protocol, checked by the Predictor
                    problem = unknown_organ_problem(name, value, list(cfg.protocol.oars))
                    errors += _check(problem is None, key, value, problem or "")
    return errors


def is_body_crop_margin(margin: object) -> bool:
    """Whether ``margin`` (``model.body_crop_margin``) is ``None`` or an integer >= 0."""
    return margin is None or _is_int(margin, 0)


#: What ``model.body_crop_margin`` may be.
BODY_CROP_RANGE = "must be an integer >= 0 (network-grid voxels), or null"


def body_crop_problem(margin: object, loss_in_body: bool, zero_outside_body: bool
                      ) -> str | None:
    """What is wrong with ``model.body_crop_margin=margin`` beside the model's
    ``loss_in_body`` and ``zero_outside_body`` (``None``: nothing): out of range, or a box
    without the loss and the dose kept inside the body."""
    if not is_body_crop_margin(margin):
        return BODY_CROP_RANGE
    if margin is not None and not (loss_in_body and zero_outside_body):
        return ("needs model.loss_in_body=true and model.zero_outside_body=true (the network "
                "sees only the body's box)")
    return None


def body_crop_errors(cfg: Any) -> list[str]:
    """``model.body_crop_margin`` as :func:`body_crop_problem` judges it."""
    model = cfg.get("model") or {}
    if not hasattr(model, "get") or model.get("body_crop_margin") is None:
        return []
    margin = model.get("body_crop_margin")
    problem = body_crop_problem(margin, bool(model.get("loss_in_body")),
                                bool(model.get("zero_outside_body")))
    return _check(problem is None, "model.body_crop_margin", margin, problem or "")


def tta_pool_grids_problem(grids: object, factor: int | None = None) -> str | None:
    """What is wrong with ``model.tta_pool_grids`` for a network at 1/``factor`` of the
    case grid (``None``: the count alone), or ``None``."""
    if not _is_int(grids, 1):
        return "must be a whole number of pooling grids >= 1 (1 = grid 0 only)"
    if factor is None:
        return None
    if grids > 1 and int(factor) == 1:
        return "pooling grids need a network at a coarser grid (model.resolution_factor > 1)"
    if grids > int(factor) ** 3:
        return f"pooling by {factor} has {int(factor) ** 3} grids"
    return None


def tta_pool_grids_errors(cfg: Any) -> list[str]:
    """``model.tta_pool_grids`` as :func:`tta_pool_grids_problem` judges it beside the
    model's grid, and ``predict`` / ``evaluate`` ``tta_pool_grids=`` (the checkpoint's grid
    is checked when it is read) a whole number or null."""
    errors = []
    grids = cfg.get("tta_pool_grids") if hasattr(cfg, "get") else None
    if grids is not None:
        problem = tta_pool_grids_problem(grids)
        errors += _check(problem is None, "tta_pool_grids", grids, f"{problem}, or null")
    model = cfg.get("model") or {}
    if hasattr(model, "get") and "tta_pool_grids" in model:
        grids = model.get("tta_pool_grids")
        problem = tta_pool_grids_problem(grids, model.get("resolution_factor", 1))
        errors += _check(problem is None, "model.tta_pool_grids", grids, problem or "")
    return errors


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
