"""Compile the pipeline to the YAML people upload in the Kubeflow UI.

``local`` keeps the default image and no retries (what kfp.local runs);
``cluster`` adds what a real cluster needs, all from `ClusterConfig`: the
registry images (CUDA for the GPU stages), GPU requests and node-pool
placement, CPU/memory requests and limits, S3 credentials from a Kubernetes
Secret (never a value in the YAML), retries with exponential backoff, and the
pod security kfp-kubernetes can express (see `harden`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kfp import compiler, dsl

from kubetrain import registry
from kubetrain.cluster import k8s, security
from kubetrain.config.cluster import ClusterConfig
from kubetrain.core.errors import KubetrainError

COMPILED_DIR = Path("pipelines/compiled")
#: Tasks whose pod needs a GPU (the registry's placement); tune only creates a Katib
#: Experiment, whose trials get the GPUs.
GPU_STAGES = registry.gpu_tasks()
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def place_on_cluster(task: dsl.PipelineTask, stage: str, cluster: ClusterConfig) -> None:
    """Image, resources and scheduling of one task; GPU stages go to the GPU pool only."""
    from kfp import kubernetes

    # a TrainJob-mode train pod only submits and follows the job: the job's pods get the GPUs
    gpu = stage in GPU_STAGES and cluster.gpus > 0 and not cluster.trainjob
    task.set_container_image(cluster.image("cuda" if gpu else "cpu"))
    label_key, label_value = cluster.node_label
    if gpu:
        task.set_accelerator_type(cluster.gpu_resource)
        task.set_accelerator_limit(cluster.gpus)
        task.set_cpu_request(cluster.gpu_cpu).set_cpu_limit(cluster.gpu_cpu)
        task.set_memory_request(cluster.gpu_memory).set_memory_limit(cluster.gpu_memory)
        if cluster.gpu_node_selector:
            kubernetes.add_node_selector(task, label_key, label_value)
        if cluster.gpu_toleration:
            key, value, effect = cluster.taint
            kubernetes.add_toleration(
                task,
                key=key,
                operator="Equal" if value else "Exists",
                value=value or None,
                effect=effect,
            )
    else:
        task.set_cpu_request(cluster.cpu_cpu).set_cpu_limit(cluster.cpu_limit())
        task.set_memory_request(cluster.cpu_memory).set_memory_limit(cluster.cpu_memory)
        if cluster.gpu_node_selector:  # keep CPU work off the expensive nodes, taint or not
            kubernetes.add_node_affinity(
                task,
                match_expressions=[
                    {"key": label_key, "operator": "NotIn", "values": [label_value]}
                ],
            )
        if cluster.cpu_node_selector:
            kubernetes.add_node_selector(task, *cluster.cpu_node_selector.split("=", 1))
    kubernetes.use_secret_as_env(
        task, secret_name=cluster.s3_secret, secret_key_to_env={k: k for k in S3_KEYS}
    )
    task.set_env_variable("AWS_DEFAULT_REGION", cluster.s3_region)
    if cluster.s3_endpoint_url:
        task.set_env_variable("S3_ENDPOINT_URL", cluster.s3_endpoint_url)
    if stage == "cleanup" and cluster.webhook_secret:  # the URL may hold a token: Secret only
        from kubetrain.cluster.cleanup import WEBHOOK_ENV

        kubernetes.use_secret_as_env(
            task, secret_name=cluster.webhook_secret, secret_key_to_env={"url": WEBHOOK_ENV}
        )
    harden(task, stage)


def harden(task: dsl.PipelineTask, stage: str) -> None:
    """The restricted pod security kfp-kubernetes 2.17 can put on a task.

    Set here (KubernetesExecutorConfig): the user container's runAsUser/runAsGroup
    10001 and runAsNonRoot (`set_security_context`; KFP backends that predate it
    ignore the field, and the image's `USER 10001` still applies), emptyDir
    volumes at /tmp and $HOME/.cache, the cache variables pointing into them, and
    pod labels. KFP has no field for readOnlyRootFilesystem, allowPrivilegeEscalation,
    capabilities, seccompProfile or any pod-level securityContext: recent KFP
    backends default the last three on the pods they write (kubeflow/pipelines#12782);
    the namespace's Pod Security labels enforce the rest (manifests/base/namespace.yaml,
    README "Pod security").
    """
    from kfp import kubernetes

    kubernetes.set_security_context(
        task, run_as_user=security.UID, run_as_group=security.GID, run_as_non_root=True
    )
    for mount in security.scratch_mounts():
        kubernetes.empty_dir_mount(task, volume_name=mount["name"], mount_path=mount["mountPath"])
    for name, value in security.SCRATCH_ENV.items():
        task.set_env_variable(name, value)
    for key, value in k8s.labels(stage).items():
        kubernetes.add_pod_label(task, key, value)


def pipeline_for(target: str, cluster: ClusterConfig | None = None):
    from kubetrain.pipelines.training import TaskPolicy, build_pipeline

    if target == "local":
        return build_pipeline()
    if target != "cluster":
        raise KubetrainError(f"unknown target {target!r}; use local or cluster")
    cluster = cluster or ClusterConfig()
    return build_pipeline(
        TaskPolicy(
            retries=cluster.retries,
            backoff_seconds=cluster.backoff_seconds,
            configure=lambda task, stage: place_on_cluster(task, stage, cluster),
            ttl_seconds=cluster.ttl_seconds or None,
            cluster=dataclasses.asdict(cluster),
        )
    )


def compile_pipeline(
    target: str = "local", output: Path | None = None, cluster: ClusterConfig | None = None
) -> Path:
    """Write the pipeline YAML (PipelineSpec, plus PlatformSpec for the cluster)."""
    pipeline = pipeline_for(target, cluster)
    name = "training-pipeline.yaml" if target == "local" else "training-pipeline-cluster.yaml"
    path = Path(output) if output else COMPILED_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return path
