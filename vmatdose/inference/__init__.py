"""Trained models applied to case files: the checkpoint contract, the predictor, and the
prediction files (see ``docs/architecture.md``, "Checkpoint contract")."""

from vmatdose.inference.checkpoint import (
    CHECKPOINT_KEY,
    Checkpoint,
    CheckpointContract,
    CheckpointError,
    read_checkpoint,
    training_contract,
)
from vmatdose.inference.predictions import load_prediction, read_predictions, save_prediction
from vmatdose.inference.predictor import Prediction, Predictor, predict_image, resolve_device

__all__ = ["CHECKPOINT_KEY", "Checkpoint", "CheckpointContract", "CheckpointError",
           "Prediction", "Predictor", "load_prediction", "predict_image", "read_checkpoint",
           "read_predictions", "resolve_device", "save_prediction", "training_contract"]
