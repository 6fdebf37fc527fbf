"""The paper's experiments: training (Algorithm 1), evaluation, checkpoints, metrics and the σ sweep
(``taskrouting.training.sweep``).

Needs the ``train`` extra (``pip install 'taskrouting[train]'``) for the progress bar and the
bundled digits set; the layers in ``taskrouting.nn`` do not.
"""
from .batches import epoch_plan
from .checkpoints import CHECKPOINT, CheckpointError
from .config import BN_EVAL, MODELS, ConfigError, ModelBuildError, TrainConfig, build_model, seed_everything
from .evaluation import evaluate, predict, recalibrate_bn
from .loop import TrainingDiverged, fit, run_experiment, train_epoch
from .metrics import TaskMetrics, binary_metrics, format_table, majority_baseline, metrics_from_predictions
from .results import write_csv, write_json, write_results

__all__ = ["TrainConfig", "ModelBuildError", "MODELS", "BN_EVAL", "build_model", "seed_everything", "train_epoch",
           "fit", "run_experiment", "epoch_plan", "evaluate", "predict", "recalibrate_bn", "CHECKPOINT", "TaskMetrics",
           "binary_metrics", "format_table", "majority_baseline", "metrics_from_predictions", "write_csv",
           "write_json", "write_results", "CheckpointError", "ConfigError", "TrainingDiverged"]
