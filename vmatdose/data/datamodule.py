"""Lightning data module: case files -> seeded split -> MONAI datasets -> loaders."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose

from vmatdose.config_schema import CT_WINDOW_HU, SDF_SCALE_MM, DataConfig, SplitConfig
from vmatdose.data.case import list_case_files
from vmatdose.data.conditioning import conditioning_spec
from vmatdose.data.device_cache import pool_grids_problem, rotation_problem
from vmatdose.data.pipeline import (
    InputSettings,
    SamplingSettings,
    assemble_batch,
    build_transforms,
    check_sector_augment,
)
from vmatdose.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def make_split(case_ids: Sequence[str], val_fraction: float, test_fraction: float,
               seed: int) -> dict[str, list[str]]:
    """Shuffle ``case_ids`` with ``seed`` and cut them into train/val/test (at least one
    case in val and test when there are three or more cases)."""
    ids = sorted(case_ids)
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    n = len(order)
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def train_on(split: Mapping[str, Sequence[str]], splits: Sequence[str]
             ) -> dict[str, list[str]]:
    """``split`` with the cases of every split in ``splits`` (``data.split.train_on``, which
    holds ``train``) in its ``train`` list, in split order; the other lists are kept, so a
    split named here is evaluated in-sample."""
    trained = list(split["train"])
    for name in splits:
        trained += [i for i in split[name] if i not in trained]
    return {**{k: list(v) for k, v in split.items()}, "train": trained}


def read_split(path: str | Path, known_ids: Sequence[str]) -> dict[str, list[str]]:
    """Read a split JSON ``{"train": [...], "val": [...], "test": [...]}`` and check it."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read split file ({err})") from err
    missing_keys = [k for k in SPLITS if k not in split]
    if missing_keys:
        raise ValueError(f"{path}: split file lacks {missing_keys}")
    unknown = sorted(set().union(*(split[k] for k in SPLITS)) - set(known_ids))
    if unknown:
        raise ValueError(f"{path}: split names cases with no case file: {unknown[:5]}")
    return {k: list(split[k]) for k in SPLITS}


class DoseDataModule(L.LightningDataModule):
    """Case files in ``cases_dir`` as train/val/test loaders of dict samples.

    See :mod:`vmatdose.data.pipeline` for the sample keys and shapes. If the folder holds
    no case files and it is the folder the ``generator`` (the phantom) fills, it is generated
first; any other folder without case files is an error naming it.
    """

    def __init__(
        self,
        cases_dir: str,
        structures: Sequence[str],
        targets: Sequence[str],
        prescriptions_gy: Mapping[str, float],
        dose_scale_gy: float,
        generator: Callable[..., object] | None = None,
        split: Mapping | None = None,
        split_output: str | None = None,
        patch_size: Sequence[int] | None = None,
        batch_size: int = DataConfig.batch_size,
        num_workers: int = DataConfig.num_workers,
        signed_distance: bool = DataConfig.signed_distance,
        sdf_scale_mm: float = SDF_SCALE_MM,
        ct_window: Sequence[float] = CT_WINDOW_HU,
        lr_pairs: Sequence[Sequence[str]] = (),
        augment: Mapping | None = None,
        cache: bool = DataConfig.cache,
        cache_budget_gb: float | None = DataConfig.cache_budget_gb,
        divisible_by: int = DataConfig.divisible_by,
        max_cases: int | None = None,
        prior_dose: Mapping | None = None,
        resolution_factor: int = DataConfig.resolution_factor,
        patch_sampling: str = DataConfig.patch_sampling,
        dose_patch_fraction: float = DataConfig.dose_patch_fraction,
        compact: bool = DataConfig.compact,
        device_cache: bool = DataConfig.device_cache,
        cache_workers: int = DataConfig.cache_workers,
        conditioning: str = DataConfig.conditioning,
        constraints: Sequence[Mapping] = (),
        beams: Mapping | None = None,
    ):
        """The arguments are the data config's keys (:class:`vmatdose.config_schema.DataConfig`
        lists them and holds their defaults, which these take; ``None`` or empty: the
        schema's ``split`` and ``augment``, no prior, beams or constraints; there is no
        catch-all, so an unknown key is an error).

        ``constraints``: the protocol's clinical constraints ``{structure, metric, op,
        limit}`` (the conditioning vector's limits); ``beams``: the protocol's beam
        arrangement (:mod:`vmatdose.data.beams`), ``None`` for none.

        Memory and sampling (see :mod:`vmatdose.data.pipeline`): ``compact`` caches
        volumes in 8/16 bits and casts them to float per batch on the device;
        ``device_cache`` stacks the whole training split on the training device and
        augments it there (:mod:`vmatdose.data.device_cache`); ``patch_sampling`` is
        ``uniform`` or ``dose`` (``dose_patch_fraction`` of the patches centred on voxels
        above 10 % of the highest prescription); ``prior_dose`` adds the prior-dose
        channel; ``beams`` is the protocol's beam arrangement for cases without their own
        (the beam prior's); ``resolution_factor`` pools every volume by that factor.
        ``cache_budget_gb``: the most memory the cached training and validation volumes may
        take (estimated from the case headers, :meth:`cache_estimate_gb`); above it the
        cases are read from disk for every sample instead (``None``: no limit).
        ``conditioning``: the model's (``model.conditioning``); other than ``none``, samples
        carry the plan's conditioning vector (:mod:`vmatdose.data.conditioning`)."""
        super().__init__()
        self.cases_dir = Path(cases_dir)
        self.structures = list(structures)
        self.targets = list(targets)
        self.prescriptions_gy = dict(prescriptions_gy)
        self.dose_scale_gy = float(dose_scale_gy)
        self.generator = generator
        self.split_cfg = SplitConfig(**dict(split or {}))
        self.split_output = split_output
        self.max_cases = max_cases
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache, self.cache_workers = cache, int(cache_workers)
        self.cache_budget_gb = cache_budget_gb
        self.device_cache = bool(device_cache)
        self.compact = bool(compact or device_cache)
        self.constraints = [dict(c) for c in constraints or ()]
        self.beams = beams
        self.conditioning = conditioning_spec(conditioning, self.targets,
                                              self.constraints, self.dose_scale_gy)
        self.split: dict[str, list[str]] | None = None
        self._datasets: dict[str, Dataset] = {}
        self._device_batches = None
        self.inputs = self._input_settings(ct_window, signed_distance, sdf_scale_mm,
                                           prior_dose)
        self.sampling = SamplingSettings(
            list(patch_size) if patch_size else None, divisible_by,
            [list(p) for p in lr_pairs], dict(augment or {}), patch_sampling,
            float(dose_patch_fraction))
        check_sector_augment(self.inputs, self.sampling)
        problem = pool_grids_problem(self.sampling.augment, resolution_factor,
                                     self.device_cache)
        if self.device_cache:
            problem = problem or rotation_problem(self.sampling.augment,
                                                  self.sampling.patch_size)
        if problem:
            raise ValueError(problem)
        self.resolution_factor = int(resolution_factor)
        self.pool_grids = int(self.sampling.augment.get("pool_grids", 1))
        self.train_transform, self.eval_transform = self._pipelines(self.resolution_factor)

    def _input_settings(self, ct_window: Sequence[float], signed_distance: bool,
                        sdf_scale_mm: float, prior_dose: Mapping | None) -> InputSettings:
        """What every sample of this data holds (the protocol's part from ``self``)."""
        return InputSettings(
            self.structures, self.dose_scale_gy, ct_window=ct_window,
            signed_distance=signed_distance, sdf_scale_mm=sdf_scale_mm,
            prior_dose=dict(prior_dose) if prior_dose else None,
            prescriptions_gy=self.prescriptions_gy, conditioning=self.conditioning,
            default_beams=dict(self.beams) if self.beams else None)

    def _pipelines(self, resolution_factor: int) -> tuple[Compose, Compose]:
        """The training and the evaluation pipeline. With ``device_cache`` the training
        one stops before augmentation and patches: the device does them."""
        storage = dict(resolution_factor=resolution_factor, compact=self.compact)
        if not self.device_cache:
            return (build_transforms(self.inputs, self.sampling, **storage),
                    build_transforms(self.inputs, **storage))
        return (build_transforms(self.inputs, None, pool_grids=self.pool_grids, **storage),
                build_transforms(self.inputs, **storage))

    def prepare_data(self) -> None:
        """Generate the phantom on its config's first use (its own folder, said on the
        console); any other folder must already hold case files."""
        if not list_case_files(self.cases_dir) and self._generates_here():
            log.warning("%s: no case files yet; generating the phantom cases there (first "
                        "use of the phantom data config)", self.cases_dir)
            self.generator()
        if not list_case_files(self.cases_dir):
            raise InputError(
                f"{self.cases_dir}: no case files (*.npz). Run `python -m vmatdose.preprocess` "
                "or point data.cases_dir at a folder of case files.")

    def _generates_here(self) -> bool:
        """Whether ``cases_dir`` is the folder the configured generator fills."""
        target = getattr(self.generator, "keywords", {}).get("output_dir")
        return target is not None and Path(target).resolve() == Path(self.cases_dir).resolve()

    def case_paths(self) -> dict[str, Path]:
        """case id (file stem) -> path, for every case file in ``cases_dir``."""
        paths = {p.stem: p for p in list_case_files(self.cases_dir)}
        if self.max_cases:
            paths = dict(list(paths.items())[: self.max_cases])
        return paths

    def setup(self, stage: str | None = None) -> None:
        self.ensure_split()

    def ensure_split(self) -> dict[str, list[str]]:
        """Derive (or read) the train/val/test split once, add the cases of
        ``split.train_on``'s other splits to ``train``, and write it to ``split_output``."""
        if self.split is not None:
            return self.split
        self.split = train_on(self.derive_split(), self.split_cfg.train_on)
        also = [name for name in self.split_cfg.train_on if name != "train"]
        if also:
            log.warning("data.split.train_on=%s: the %s cases are trained on too; scores on "
                        "them (the validation loop's included) are in-sample",
                        list(self.split_cfg.train_on), " and ".join(also))
        if self.split_output:
            Path(self.split_output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.split_output).write_text(json.dumps(self.split, indent=2))
        return self.split

    def derive_split(self) -> dict[str, list[str]]:
        """The split file's split (``split.file``), else the seeded fractions' one."""
        ids = list(self.case_paths())
        if self.split_cfg.file:
            return read_split(self.split_cfg.file, ids)
        return make_split(ids, self.split_cfg.val_fraction, self.split_cfg.test_fraction,
                          self.split_cfg.seed)

    def dataset(self, name: str) -> Dataset:
        """The MONAI dataset of split ``name`` (built on first use)."""
        if name not in self._datasets:
            items = [{"path": str(p)} for p in self.paths_of(name)]
            transform = self.train_transform if name == "train" else self.eval_transform
            # MONAI's random transforms draw from their own RandomState: seed it from the
            # run's seed (seed_everything) so augmentation repeats; monai's DataLoader
            # re-seeds it per worker.
            transform.set_random_state(seed=int(torch.initial_seed() % 2**32))
            # CacheDataset keeps everything up to the first random transform in memory;
            # the device cache reads the training split once into its own stack instead.
            cached = self._caches() and not (name == "train" and self.device_cache)
            self._datasets[name] = (CacheDataset(items, transform, progress=False,
                                                 num_workers=self.cache_workers)
                                    if cached else Dataset(items, transform))
        return self._datasets[name]

    def _caches(self) -> bool:
        """Whether the datasets are cached: ``cache``, within ``cache_budget_gb`` (decided
        once, said on the console when the budget turns it off)."""
        if not self.cache or self.cache_budget_gb is None:
            return bool(self.cache)
        if not hasattr(self, "_within_budget"):
            estimate = self.cache_estimate_gb()
            self._within_budget = estimate <= self.cache_budget_gb
            if not self._within_budget:
                log.warning("cached volumes would take about %.1f GB, over "
                            "data.cache_budget_gb=%g: reading every sample from its case "
                            "file instead (slower; raise the budget or coarsen the grid)",
                            estimate, self.cache_budget_gb)
        return self._within_budget

    def cache_estimate_gb(self) -> float:
        """Memory (GB) of the cached training and validation volumes, from the case headers:
        per voxel 2 bytes each for CT, dose, the prior and the SDFs (float16 with
        ``compact``, else 4), one bit per mask packed per 8 (else a float per mask) and the
        body."""
        from vmatdose.data.case import read_case_header

        n = len(self.structures)
        if self.compact:
            per_voxel = 2 * (2 + bool(self.inputs.prior)) + -(-n // 8) + 1
        else:
            per_voxel = 4 * (2 + bool(self.inputs.prior) + n + 1)
        if self.inputs.signed_distance:
            per_voxel += n * (2 if self.compact else 4)
        voxels = sum(int(np.prod(read_case_header(p).shapes["ct"]))
                     for name in ("train", "val") for p in self.paths_of(name))
        return voxels * per_voxel / 1e9

    def device_cache_estimate_gb(self) -> float:
        """Memory (GB) of the device cache's stack of the training split, from the case
        headers: each case pooled by ``resolution_factor`` and held on ``pool_grids``
        grids; per voxel 2 bytes each for CT, dose, (the prior), (the SDFs) and, pooled,
        the mask and body fractions (unpooled: the masks packed to bits, the body 1 byte)."""
        from vmatdose.data.case import read_case_header

        n, f = len(self.structures), self.resolution_factor
        per_voxel = 2 * (2 + bool(self.inputs.prior) + n * self.inputs.signed_distance)
        per_voxel += 2 * (n + 1) if f > 1 else -(-n // 8) + 1
        voxels = sum(int(np.prod([s // f for s in read_case_header(p).shapes["ct"]]))
                     for p in self.paths_of("train"))
        return voxels * self.pool_grids * per_voxel / 1e9

    def paths_of(self, name: str) -> list[Path]:
        """Case file paths of split ``name`` (``all`` for every case)."""
        paths = self.case_paths()
        if name == "all":
            return list(paths.values())
        return [paths[i] for i in self.ensure_split()[name]]

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(self.dataset(name), batch_size=batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        if self.device_cache:
            return self.device_batches()
        return self._loader("train", True, self.batch_size)

    def device_batches(self, device: torch.device | str | None = None):
        """The training split stacked on ``device`` (default: the trainer's), built once."""
        from vmatdose.data.device_cache import DeviceBatches

        if self._device_batches is None:
            if device is None:
                device = (self.trainer.strategy.root_device if self.trainer is not None
                          else "cpu")
            self._check_device_cache_budget()
            dataset = self.dataset("train")
            sampling = self.sampling
            # the cases are read by cache_workers threads (as CacheDataset would) and
            # written into the stack one by one: the stack is the only copy kept
            with ThreadPoolExecutor(max(self.cache_workers, 1)) as pool:
                self._device_batches = DeviceBatches(
                    pool.map(dataset.__getitem__, range(len(dataset))), self.batch_size,
                    device, self.structures, sampling.lr_pairs, sampling.augment,
                    sampling.patch_size,
                    sampling.dose_patch_fraction if sampling.patch_sampling == "dose" else 0.0,
                    seed=int(torch.initial_seed() % 2**31),
                    prior_permutation=self.inputs.prior_lr_permutation, count=len(dataset))
        return self._device_batches

    def _check_device_cache_budget(self) -> None:
        """Refuse, before any case is read, a device cache over ``cache_budget_gb``: the
        stack has no disk fallback (the ordinary loader has)."""
        if self.cache_budget_gb is None:
            return
        estimate = self.device_cache_estimate_gb()
        if estimate > self.cache_budget_gb:
            raise InputError(
                f"{self.cases_dir}: data.device_cache=true would hold about {estimate:.3g} GB "
                f"of training volumes ({len(self.paths_of('train'))} cases, "
                f"data.resolution_factor={self.resolution_factor}, "
                f"data.augment.pool_grids={self.pool_grids}), over "
                f"data.cache_budget_gb={self.cache_budget_gb:g}: lower pool_grids, coarsen "
                "the grid, raise the budget or set data.device_cache=false")

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Compact batches become float32 ones with their ``image`` here, on the device."""
        if not self.compact:
            return batch
        return assemble_batch(batch, self.inputs.signed_distance, self.inputs.prior)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, 1)
