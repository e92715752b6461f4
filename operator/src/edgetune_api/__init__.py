"""edgetune's API: typed models of the custom resources, shared by the operator and the trainer.

The CRDs in ``crds/`` are generated from these models (``python -m edgetune_api write``).
"""

from edgetune_api.adapter_release import AdapterRelease, AdapterReleaseSpec, AdapterReleaseStatus
from edgetune_api.edge_cluster import EdgeCluster, EdgeClusterSpec, EdgeClusterStatus
from edgetune_api.meta import API_VERSION, GROUP, VERSION, Condition, parse_duration, parse_quantity
from edgetune_api.training_job import (
    TRAINER_MEMORY_FLOOR,
    EdgeTrainingJob,
    EdgeTrainingJobSpec,
    EdgeTrainingJobStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "TRAINER_MEMORY_FLOOR",
    "VERSION",
    "AdapterRelease",
    "AdapterReleaseSpec",
    "AdapterReleaseStatus",
    "Condition",
    "EdgeCluster",
    "EdgeClusterSpec",
    "EdgeClusterStatus",
    "EdgeTrainingJob",
    "EdgeTrainingJobSpec",
    "EdgeTrainingJobStatus",
    "parse_duration",
    "parse_quantity",
]
