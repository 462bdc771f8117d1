"""Training: the loop a training stage hands its ``TrainJob`` to, in this process or on Ray Train workers, with
checkpoints it resumes from."""
from .distributed import Distillation, StageTraining, TrainJob, run_training
from .loop import NonFiniteLossError, TrainingError, check_trainable

__all__ = ["Distillation", "NonFiniteLossError", "StageTraining", "TrainJob", "TrainingError", "check_trainable",
           "run_training"]
