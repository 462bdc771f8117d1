"""The stages: the stage table (the one list of stages, holding their functions), the stage functions, their
fingerprints and the DAG that runs them."""
from .dag import Pipeline, StageOutcome
from .fingerprints import stage_fingerprints
from .functions import StageContext
from .table import STAGE_TABLE, STAGES, TRAINING_STAGES, Stage, stage

__all__ = ["Pipeline", "STAGES", "STAGE_TABLE", "Stage", "StageContext", "StageOutcome", "TRAINING_STAGES", "stage",
           "stage_fingerprints"]
