"""The kubeloop.dev/v1alpha1 API: the one source of truth for the CRDs in manifests/ and helm/."""

from kubeloop.api.batchprediction import BatchPrediction, BatchPredictionSpec
from kubeloop.api.common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta, Resource
from kubeloop.api.load import KINDS, load_resources, parse_resource
from kubeloop.api.modeldeployment import ModelDeployment, ModelDeploymentSpec
from kubeloop.api.modelversion import ModelVersion, ModelVersionSpec
from kubeloop.api.trainingjob import TrainingJob, TrainingJobSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "BatchPrediction",
    "BatchPredictionSpec",
    "Condition",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelVersion",
    "ModelVersionSpec",
    "ObjectMeta",
    "Resource",
    "TrainingJob",
    "TrainingJobSpec",
    "load_resources",
    "parse_resource",
]
