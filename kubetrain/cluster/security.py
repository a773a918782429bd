"""Restricted pod security for every pod spec kubetrain writes.

One source for the Pod Security Standard "restricted" fields (Kubernetes docs,
"Pod Security Standards") plus what a read-only root filesystem needs:

- the container runs as the images' user (uid/gid 10001, `USER 10001` in
  docker/Dockerfile.*), non-root, without privilege escalation, with every
  capability dropped, the runtime's default seccomp profile and a read-only
  root filesystem;
- so the writable places are emptyDir volumes: ``/tmp`` (tempfile, KFP's
  executor) and a cache directory at ``$HOME/.cache`` of the images, which the
  cache variables of matplotlib, torch, Triton, CUDA and XDG point into.

The Katib trial Job (`kubetrain.cluster.katib`), the TrainJob
(`kubetrain.cluster.trainjob`) and the SparkApplication's pod templates
(`kubetrain.cluster.spark`) apply these to the pod specs they write, e.g.::

    pod = harden_pod_spec({"containers": [container], ...}, cluster.workload_service_account)

The compiled pipeline's own pods are KFP's to write: `kubetrain.cluster.compile.harden`
sets the part kfp-kubernetes can express (identity, these emptyDirs and env), and
the namespace's Pod Security labels (manifests/base/namespace.yaml) enforce the
rest.
"""

from __future__ import annotations

import copy
from typing import Any

#: The images' user and group (docker/Dockerfile.cpu and .cuda: `USER 10001`).
UID = 10001
GID = 10001
#: The images' HOME (docker/Dockerfile.*: `HOME=/home/kubetrain`).
HOME = "/home/kubetrain"
TMP_DIR = "/tmp"
#: `$HOME/.cache` of the images: tools that ignore the variables below still land here.
CACHE_DIR = f"{HOME}/.cache"
TMP_VOLUME = "kubetrain-tmp"
CACHE_VOLUME = "kubetrain-cache"
#: Where the libraries the stages load write caches and config (all in the cache volume).
SCRATCH_ENV: dict[str, str] = {
    "XDG_CACHE_HOME": CACHE_DIR,
    "XDG_CONFIG_HOME": f"{CACHE_DIR}/config",
    "MPLCONFIGDIR": f"{CACHE_DIR}/matplotlib",
    "TORCH_HOME": f"{CACHE_DIR}/torch",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torchinductor",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "CUDA_CACHE_PATH": f"{CACHE_DIR}/nv",
    "SCIKIT_LEARN_DATA": f"{CACHE_DIR}/scikit_learn_data",
    "TMPDIR": TMP_DIR,
}


def container_security_context() -> dict[str, Any]:
    """The container `securityContext`: PSS restricted, read-only root filesystem."""
    return {
        "runAsUser": UID,
        "runAsGroup": GID,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The pod `securityContext`: the same identity and seccomp for every container.

    Pod-level, so containers kubetrain does not write (Katib's injected metrics
    collector, an init container a runtime adds) run non-root with RuntimeDefault
    seccomp too. ``fsGroup`` makes mounted volumes writable by the group.
    """
    return {
        "runAsUser": UID,
        "runAsGroup": GID,
        "runAsNonRoot": True,
        "fsGroup": GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volumes() -> list[dict[str, Any]]:
    """The pod's emptyDir volumes behind `scratch_mounts` (node-local, deleted with the pod)."""
    return [{"name": TMP_VOLUME, "emptyDir": {}}, {"name": CACHE_VOLUME, "emptyDir": {}}]


def scratch_mounts() -> list[dict[str, Any]]:
    """A container's writable places under a read-only root: /tmp and the cache directory."""
    return [
        {"name": TMP_VOLUME, "mountPath": TMP_DIR},
        {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
    ]


def scratch_env() -> list[dict[str, str]]:
    """Container env pointing every cache and config directory into the cache volume."""
    return [{"name": k, "value": v} for k, v in SCRATCH_ENV.items()]


def harden_container(container: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``container`` with the restricted context, the scratch mounts and env.

    Mounts and variables it already has win (same mountPath / name).
    """
    out = copy.deepcopy(container)
    out["securityContext"] = {**container_security_context(), **(out.get("securityContext") or {})}
    mounts = out.setdefault("volumeMounts", [])
    taken = {m["mountPath"] for m in mounts}
    mounts += [m for m in scratch_mounts() if m["mountPath"] not in taken]
    env = out.setdefault("env", [])
    names = {e["name"] for e in env}
    env += [e for e in scratch_env() if e["name"] not in names]
    return out


def harden_pod_spec(spec: dict[str, Any], service_account: str) -> dict[str, Any]:
    """A copy of pod ``spec`` as a workload pod: restricted, no Kubernetes API credentials.

    Sets ``serviceAccountName`` (`ClusterConfig.workload_service_account`: no
    RBAC) and ``automountServiceAccountToken: false``, the pod security context,
    the scratch volumes, and hardens every container and init container.
    """
    out = copy.deepcopy(spec)
    out["serviceAccountName"] = service_account
    out["automountServiceAccountToken"] = False
    out["securityContext"] = {**pod_security_context(), **(out.get("securityContext") or {})}
    volumes = out.setdefault("volumes", [])
    names = {v["name"] for v in volumes}
    volumes += [v for v in scratch_volumes() if v["name"] not in names]
    for key in ("initContainers", "containers"):
        if key in out:
            out[key] = [harden_container(c) for c in out[key]]
    return out
