"""Where and how the pipeline runs on a Kubeflow cluster: one typed object.

The run settings (`RunConfig`) say *what* to train; these say *where*: images,
GPU node pool, resources, object storage, retries. `kubetrain compile --target
cluster`, `kubetrain submit`, `kubetrain render` and the platform ConfigMap in
`manifests/` all read this one object, each field overridable by a flag of the
same name (`--image-registry`, `--gpu-node-selector`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

from kubetrain import __version__
from kubetrain.core.errors import KubetrainError

_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|K|M|G|T)?$")
_LABEL = re.compile(r"^([\w.-]+/)?[\w.-]+=[\w.-]*$")
_TAINT = re.compile(r"^([\w.-]+/)?[\w.-]+(=[\w.-]*)?:(NoSchedule|PreferNoSchedule|NoExecute)$")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # OCI image digest (lower-case hex)
_SPARK_MEMORY = re.compile(r"[1-9][0-9]*[kmgt]")  # a JVM size as Spark reads it: 512m, 2g
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # RFC 1123 subdomain


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster placement; defaults suit a Kubeflow 1.10+ install with an NVIDIA GPU pool."""

    image_registry: str = _opt("ghcr.io/kubetrain", "Registry/repository prefix of the images.")
    image_tag: str = _opt(__version__, "Tag of the images `make images` built.")
    cpu_image_digest: str = _opt(
        "",
        "Digest (sha256:<64 hex>) of the pushed CPU image; set, "
        "pods pull repo:tag@digest, never a moved tag.",
    )
    cuda_image_digest: str = _opt(
        "",
        "Digest (sha256:<64 hex>) of the pushed CUDA image; set, "
        "pods pull repo:tag@digest, never a moved tag.",
    )
    namespace: str = _opt("kubetrain", "Kubernetes namespace (Kubeflow profile) runs go to.")
    service_account: str = _opt(
        "kubetrain-pipeline-runner", "Service account the pipeline pods run as."
    )
    workload_service_account: str = _opt(
        "kubetrain-workload",
        "Service account of Katib trial and TrainJob pods: no RBAC, no "
        "API token; S3 keys reach them only as env from s3_secret.",
    )
    gpu_resource: str = _opt("nvidia.com/gpu", "Accelerator resource name GPU stages request.")
    gpus: int = _opt(1, "GPUs per node for training and each Katib trial.")
    num_nodes: int = _opt(
        1,
        "Nodes for the train step; more than 1 (or gpus > 1) runs it as a "
        "Kubeflow Trainer TrainJob (DDP).",
    )
    gpu_node_selector: str = _opt(
        "kubetrain.io/node-pool=gpu", "key=value label of the GPU node pool."
    )
    gpu_toleration: str = _opt(
        "nvidia.com/gpu=present:NoSchedule",
        "key[=value]:effect taint of the GPU nodes that GPU stages tolerate.",
    )
    cpu_node_selector: str = _opt("", "Optional key=value label pinning CPU stages to a pool.")
    gpu_cpu: str = _opt("4", "CPU request and limit of GPU stages.")
    gpu_memory: str = _opt("16Gi", "Memory request and limit of GPU stages.")
    cpu_cpu: str = _opt("1", "CPU request of CPU stages (limit: twice).")
    cpu_memory: str = _opt("2Gi", "Memory request and limit of CPU stages.")
    s3_secret: str = _opt("kubetrain-s3", "Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.")
    s3_endpoint_url: str = _opt("", "S3-compatible endpoint (MinIO, Ceph); empty for AWS.")
    s3_region: str = _opt("us-east-1", "Object storage region.")
    pipeline_root: str = _opt(
        "s3://kubetrain/pipeline-root", "Default pipeline root the kfp-launcher ConfigMap sets."
    )
    retries: int = _opt(3, "Retries of every task (exponential backoff).")
    backoff_seconds: int = _opt(30, "First retry delay; doubles each time, 10 minutes at most.")
    trainer_runtime: str = _opt(
        "torch-distributed", "Kubeflow Trainer ClusterTrainingRuntime of multi-node TrainJobs."
    )
    spark_executors: int = _opt(
        2, "Executors of the clean step's SparkApplication (engine=spark on a cluster)."
    )
    spark_executor_cores: int = _opt(
        1, "CPU cores per Spark executor (the request; the limit is twice that)."
    )
    spark_executor_memory: str = _opt(
        "2g",
        "JVM heap per Spark executor, in Spark's units (512m, 2g); the pod gets half "
        "as much again for the Python workers.",
    )
    spark_driver_memory: str = _opt("1g", "JVM heap of the Spark driver, in Spark's units.")
    spark_service_account: str = _opt(
        "kubetrain-spark",
        "Service account of the Spark driver, which creates and deletes its executor "
        "pods; executors run as workload_service_account.",
    )
    wait_timeout: int = _opt(
        86400,
        "Longest wait, in seconds, for a Katib Experiment, a TrainJob or a "
        "SparkApplication to finish.",
    )
    finished_jobs: str = _opt(
        "delete",
        "What happens to a finished Katib Experiment, TrainJob or SparkApplication: "
        "delete or keep.",
    )
    ttl_seconds: int = _opt(
        604800,
        "Seconds a finished run's Argo Workflow (and its pods) is "
        "kept before Kubernetes deletes it; 0 keeps it forever. "
        "Run records and artifacts stay in KFP.",
    )
    webhook_secret: str = _opt(
        "",
        "Secret whose `url` key is a webhook that gets a JSON "
        "notification when a run ends; empty sends none.",
    )

    @property
    def checkpoint_root(self) -> str:
        """Where runs keep resumable checkpoints: beside the pipeline root, as s3:// (KFP's
        minio:// is the same store); empty for gs://, which kubetrain's storage cannot write."""
        root = self.pipeline_root.rstrip("/")
        if root.startswith("minio://"):
            root = "s3://" + root[len("minio://") :]
        return f"{root}/kubetrain-checkpoints" if root.startswith("s3://") else ""

    def __post_init__(self) -> None:
        for name in ("cpu_image_digest", "cuda_image_digest"):
            value = getattr(self, name)
            if value and not _DIGEST.fullmatch(value):
                raise KubetrainError(
                    f"{name}={value!r} must be sha256: followed by 64 lower-case "
                    "hex digits (docker buildx imagetools inspect IMAGE)"
                )
        for name in ("gpu_cpu", "gpu_memory", "cpu_cpu", "cpu_memory"):
            if not _QUANTITY.match(getattr(self, name)):
                raise KubetrainError(
                    f"{name}={getattr(self, name)!r} is not a Kubernetes "
                    "quantity; use e.g. 4, 500m, 16Gi"
                )
        for name in ("gpu_node_selector", "cpu_node_selector"):
            value = getattr(self, name)
            if value and not _LABEL.match(value):
                raise KubetrainError(f"{name}={value!r} must be key=value (a node label)")
        if self.gpu_toleration and not _TAINT.match(self.gpu_toleration):
            raise KubetrainError(
                f"gpu_toleration={self.gpu_toleration!r} must be "
                "key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
            )
        if self.workload_service_account == self.service_account:
            raise KubetrainError(
                f"workload_service_account={self.workload_service_account!r} "
                "must differ from service_account: trial and TrainJob pods "
                "would get the pipeline runner's RBAC"
            )
        if self.gpus < 0 or self.retries < 0 or self.backoff_seconds < 0:
            raise KubetrainError("gpus, retries and backoff_seconds must be >= 0")
        if self.num_nodes < 1:
            raise KubetrainError(f"num_nodes={self.num_nodes} must be at least 1")
        if self.ttl_seconds < 0:
            raise KubetrainError(f"ttl_seconds={self.ttl_seconds} must be 0 (keep) or more")
        if self.wait_timeout < 1:
            raise KubetrainError(f"wait_timeout={self.wait_timeout} must be at least 1 second")
        self._check_spark()
        if self.finished_jobs not in ("delete", "keep"):
            raise KubetrainError(f"finished_jobs={self.finished_jobs!r} must be delete or keep")
        if not self.pipeline_root.startswith(("s3://", "minio://", "gs://")):
            raise KubetrainError(
                f"pipeline_root={self.pipeline_root!r} must be an object "
                "store URI such as s3://bucket/pipeline-root"
            )

    def _check_spark(self) -> None:
        """The SparkApplication settings: sizes Spark accepts, a driver identity of its own."""
        if self.spark_executors < 1 or self.spark_executor_cores < 1:
            raise KubetrainError(
                f"spark_executors={self.spark_executors} and spark_executor_cores="
                f"{self.spark_executor_cores} must be at least 1"
            )
        for name in ("spark_executor_memory", "spark_driver_memory"):
            if not _SPARK_MEMORY.fullmatch(getattr(self, name)):
                raise KubetrainError(
                    f"{name}={getattr(self, name)!r} is not a Spark memory size; use e.g. "
                    "512m or 2g (Spark's units, not Kubernetes' Mi/Gi)"
                )
        if not _DNS_NAME.fullmatch(self.spark_service_account):
            raise KubetrainError(
                f"spark_service_account={self.spark_service_account!r} is not a service "
                "account name: lower-case letters, digits, '-' and '.'"
            )
        if self.spark_service_account in (self.service_account, self.workload_service_account):
            raise KubetrainError(
                f"spark_service_account={self.spark_service_account!r} must differ from "
                "service_account and workload_service_account: the Spark driver gets its "
                "own Role (manifests/base/spark-role.yaml)"
            )

    @classmethod
    def from_dict(cls, values: dict) -> ClusterConfig:
        """From a KFP dict parameter: protobuf Structs hand ints back as floats."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise KubetrainError(f"unknown cluster setting(s) {', '.join(unknown)}")
        return cls(**{k: int(v) if fields[k].type == "int" else v for k, v in values.items()})

    @property
    def trainjob(self) -> bool:
        """Whether the train step runs as a Trainer TrainJob (several nodes or GPUs)."""
        return self.num_nodes > 1 or self.gpus > 1

    def cpu_limit(self) -> str:
        """Twice the CPU request ('1' -> '2', '500m' -> '1000m'): burst room for CPU stages."""
        if self.cpu_cpu.endswith("m"):
            return f"{int(self.cpu_cpu[:-1]) * 2}m"
        return f"{float(self.cpu_cpu) * 2:g}"

    def gpu_scheduling(self) -> dict:
        """Pod spec fields (nodeSelector, tolerations) that put a pod on the GPU pool."""
        spec: dict = {}
        if self.gpu_node_selector:
            key, value = self.node_label
            spec["nodeSelector"] = {key: value}
        if self.gpu_toleration:
            key, value, effect = self.taint
            toleration = {"key": key, "operator": "Equal" if value else "Exists", "effect": effect}
            if value:
                toleration["value"] = value
            spec["tolerations"] = [toleration]
        return spec

    def cpu_scheduling(self) -> dict:
        """Pod spec fields that keep a CPU pod on the CPU pool: the optional CPU node label,
        and off the GPU nodes (node anti-affinity), as the pipeline's CPU steps."""
        spec: dict = {}
        if self.cpu_node_selector:
            key, value = self.cpu_node_selector.split("=", 1)
            spec["nodeSelector"] = {key: value}
        if self.gpu_node_selector:
            key, value = self.node_label
            term = {"matchExpressions": [{"key": key, "operator": "NotIn", "values": [value]}]}
            spec["affinity"] = {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                }
            }
        return spec

    def s3_env(self) -> list[dict]:
        """Container env for object storage: keys by reference to the Secret, never values."""
        env: list[dict] = [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": self.s3_secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
        env.append({"name": "AWS_DEFAULT_REGION", "value": self.s3_region})
        if self.s3_endpoint_url:
            env.append({"name": "S3_ENDPOINT_URL", "value": self.s3_endpoint_url})
        return env

    def image(self, flavor: str) -> str:
        """`cpu` or `cuda` image reference: repo:tag, or repo:tag@sha256:... with a digest.

        With a digest the runtime pulls by digest (the tag only tells people the
        release), so a re-pushed tag cannot change what runs.
        """
        reference = f"{self.image_registry}/kubetrain:{self.image_tag}-{flavor}"
        digest = getattr(self, f"{flavor}_image_digest", "")
        return f"{reference}@{digest}" if digest else reference

    @property
    def node_label(self) -> tuple[str, str]:
        key, _, value = self.gpu_node_selector.partition("=")
        return key, value

    @property
    def taint(self) -> tuple[str, str, str]:
        key_value, _, effect = self.gpu_toleration.rpartition(":")
        key, _, value = key_value.partition("=")
        return key, value, effect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ClusterConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            type=int if f.type == "int" else str,
            help=f"{f.metadata['help']} (default: {f.default})",
        )


def from_arguments(args: argparse.Namespace) -> ClusterConfig:
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(ClusterConfig)
        if getattr(args, f.name, None) is not None
    }
    return ClusterConfig(**given)
