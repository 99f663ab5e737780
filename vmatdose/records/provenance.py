"""Where an evaluation came from: checkpoint, model, data folder, protocol, code version.

Read from what the run left on disk, never from the checkpoint itself:

* ``python -m vmatdose.evaluate``: ``<output_dir>/.hydra/config.yaml`` (the composed eval
  config: ``ckpt_path`` or ``predictions_dir``, data, protocol) and, for a checkpoint,
  the training run's ``run_record.json`` two folders above it;
* the evaluation at the end of training (``<run>/eval``): ``<run>/run_record.json`` and
  the checkpoints in ``<run>/checkpoints``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vmatdose.records.run_record import git_state


def _load_yaml(path: Path) -> dict:
    """A saved config as a dict, each interpolation resolved where it can be (Hydra's
    ``${hydra:...}`` only inside a running job) and kept as text where not."""
    if not path.is_file():
        return {}
    return _resolved(OmegaConf.load(path))


def _resolved(node) -> Any:
    if OmegaConf.is_dict(node):
        return {str(k): _resolved(_child(node, k)) for k in node.keys()}
    if OmegaConf.is_list(node):
        return [_resolved(_child(node, i)) for i in range(len(node))]
    return node


def _child(node, key) -> Any:
    try:
        return node[key]
    except Exception:  # an interpolation that cannot be resolved here: keep its text
        return node._get_node(key)._value()


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_name(config: dict, choices: dict) -> str | None:
    model = config.get("model") or {}
    net = (model.get("net") or {}).get("_target_", "")
    parts = [choices.get("model"), net.rsplit(".", 1)[-1] or None,
             model.get("_target_", "").rsplit(".", 1)[-1] or None]
    shown = [p for p in dict.fromkeys(parts) if p]
    return " / ".join(shown) or None


def _checkpoint(eval_config: dict, run_dir: Path | None) -> str | None:
    if eval_config.get("ckpt_path"):
        return str(eval_config["ckpt_path"])
    if eval_config.get("predictions_dir"):
        return f"none (predicted doses from {eval_config['predictions_dir']})"
    if run_dir is not None and (run_dir / "checkpoints").is_dir():
        files = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        best = [f for f in files if f != "last.ckpt"]
        if best:
            return str(run_dir / "checkpoints" / best[-1])
        if files:
            return str(run_dir / "checkpoints" / files[0])
    return None


def find_provenance(output_dir: str | Path) -> dict[str, Any]:
    """``{checkpoint, model, data_dir, protocol, split, git_commit, run_date, report_date,
    prescriptions_gy}`` of the evaluation in ``output_dir`` (``None`` where unknown)."""
    output_dir = Path(output_dir)
    eval_config = _load_yaml(output_dir / ".hydra" / "config.yaml")
    run_dir = None
    if eval_config.get("ckpt_path"):
        candidate = Path(eval_config["ckpt_path"]).resolve().parents[1]
        run_dir = candidate if (candidate / "run_record.json").is_file() else None
    elif (output_dir.parent / "run_record.json").is_file():
        run_dir = output_dir.parent
    record = _load_json(run_dir / "run_record.json") if run_dir else {}
    train_config = record.get("config", {})
    choices = ((_load_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra") or {})
               .get("runtime", {}).get("choices", {})) if run_dir else {}
    data = eval_config.get("data") or train_config.get("data") or {}
    protocol = eval_config.get("protocol") or train_config.get("protocol") or {}
    git = record.get("git") or git_state()
    commit = git.get("commit")
    if commit and git.get("dirty"):
        commit += " (uncommitted changes)"
    run_date = datetime.fromtimestamp((run_dir / "run_record.json").stat().st_mtime,
                                      timezone.utc) if run_dir else None
    return {
        "checkpoint": _checkpoint(eval_config, run_dir),
        "model": _model_name(train_config, choices),
        "data_dir": data.get("cases_dir"),
        "protocol": protocol.get("name"),
        "split": eval_config.get("split", "test" if run_dir else None),
        "git_commit": commit,
        "run_date": run_date.strftime("%Y-%m-%d %H:%M UTC") if run_date else None,
        "report_date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "prescriptions_gy": protocol.get("prescriptions_gy") or data.get("prescriptions_gy"),
    }
