"""Champion/challenger and the deploy step, on two real bundles.

The champion is the table bundle the pipeline's stage functions trained (`conftest`);
the other is the same bundle with the network's weights replaced by a freshly
initialised network of the same spec, republished: a real, worse model. Both score
the run's raw test rows (recovered from the ingested table and the test split). The
cluster deploy runs against a fake Kubernetes API (no cluster here) and a real
`kubetrain serve` process as the endpoint its smoke test calls.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Trained, served
from kubetrain.assessment.champion import decide, objective_value
from kubetrain.cluster import inference
from kubetrain.config.cluster import ClusterConfig
from kubetrain.config.settings import DeployConfig, PublishConfig
from kubetrain.core import storage
from kubetrain.core.errors import KubetrainError
from kubetrain.core.integrity import write_checksums
from kubetrain.serving import challenge
from kubetrain.serving.heldout import heldout_rows
from kubetrain.stages import DeployRequest, deploy_here
from kubetrain.training.models import build, load_model

pytestmark = pytest.mark.integration


def _paths(t: Trained) -> tuple[str, str]:
    d = t.bundle.parents[2]  # <d>/published/<model>/<version>
    return str(d / "table"), str(d / "test")


def test_the_decision_is_strict_and_names_its_numbers():
    assert decide("accuracy", 0.9, None).deploy
    win = decide("accuracy", 0.91, 0.9)
    assert win.deploy and "0.9100 (new) against 0.9000 (served)" in win.reason
    assert not decide("accuracy", 0.9, 0.9).deploy  # a tie keeps what is serving
    assert not decide("r2", 0.905, 0.9, margin=0.01).deploy
    assert decide("r2", 0.5, 0.9, champion_error="unknown column 'x'").deploy
    assert objective_value("accuracy", ["a", "b"], ["a", "a"]) == 0.5
    assert objective_value("r2", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    with pytest.raises(KubetrainError, match="objective metric"):
        objective_value("f1", [1], [1])


@pytest.fixture(scope="module")
def worse(table_bundle: Trained, tmp_path_factory) -> Path:
    """The table bundle with an untrained network: same schema, worse predictions."""
    root = tmp_path_factory.mktemp("worse")
    files = root / "files"
    shutil.copytree(table_bundle.bundle, files, ignore=shutil.ignore_patterns(storage.MANIFEST))
    _, spec, _ = load_model(files / "pytorch")
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in build(spec).state_dict().items()}
    torch.save(state, files / "pytorch" / "weights.pt")
    write_checksums(files / "pytorch")
    return Path(storage.publish(str(files), str(root / "published" / "churn" / "v-worse") + "/"))


def test_heldout_rows_are_the_pipelines_test_rows(table_bundle):
    table, test = _paths(table_bundle)
    new = challenge.load_bundle(str(table_bundle.bundle), "pytorch")
    held = heldout_rows(new, table, test, limit=50)
    assert held.rows == table_bundle.test_rows[:50] and held.truth == table_bundle.labels[:50]


def test_two_bundles_on_the_same_split(table_bundle, worse):
    table, test = _paths(table_bundle)
    good, held = challenge.load(str(table_bundle.bundle), table, test, "pytorch")
    bad = challenge.load_bundle(str(worse), "pytorch")
    keep = challenge.challenge(bad, good, held)
    assert not keep.deploy and keep.champion > keep.challenger
    labels = good.predict_rows(held.rows).labels
    assert keep.champion == pytest.approx(
        np.mean([a == b for a, b in zip(labels, held.truth, strict=True)])
    )
    assert challenge.challenge(good, bad, held).deploy
    assert challenge.challenge(good, None, held).reason.startswith("no model is served")


def test_locally_the_decision_is_recorded_against_the_previous_version(table_bundle, worse):
    table, test = _paths(table_bundle)
    publish = PublishConfig(publish_uri=str(worse.parents[1]), model_name="churn")
    req = DeployRequest(str(worse), table, test, publish, DeployConfig(deploy=True))
    assert deploy_here(req)["decision"]["deploy"]  # the only version: nothing to beat
    mine = _republish(table_bundle.bundle, str(worse.parents[0] / "v-good") + "/")
    record = deploy_here(DeployRequest(str(worse), table, test, publish, DeployConfig(True)))
    assert record["champion"] == mine and not record["decision"]["deploy"]
    assert record["target"] == "local" and record["deployed"] is False


class FakeIsvcApi:
    """CustomObjectsApi for one InferenceService: every write bumps the generation, and
    the next read reports it Ready at ``url`` (the real server the smoke test calls)."""

    def __init__(self, url: str, existing: dict | None = None) -> None:
        self.url, self.obj, self.writes, self.deleted = url, existing, [], []

    def _store(self, body: dict) -> dict:
        generation = ((self.obj or {}).get("metadata") or {}).get("generation", 0) + 1
        meta = {**body["metadata"], "generation": generation, "resourceVersion": str(generation)}
        self.obj = {**body, "metadata": meta}
        self.writes.append(self.obj)
        return self.obj

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        return self._store(body)

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        assert body["metadata"]["resourceVersion"] == self.obj["metadata"]["resourceVersion"]
        return self._store(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if self.obj is None:
            from fakes import api_exception

            raise api_exception(404, "not found")
        ready = {"type": "Ready", "status": "True"}
        status = {"observedGeneration": self.obj["metadata"]["generation"], "conditions": [ready],
                  "address": {"url": self.url}}  # fmt: skip
        return {**self.obj, "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.deleted.append(name)


def _republish(bundle: Path, dest: str) -> str:
    """A published bundle published again at ``dest`` (its files, a new manifest)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        shutil.copytree(bundle, files, ignore=shutil.ignore_patterns(storage.MANIFEST))
        return storage.publish(str(files), dest, overwrite=True)


def _on_s3(bundle: Path, bucket: str, version: str) -> str:
    return _republish(bundle, f"s3://{bucket}/models/churn/{version}/")


def _deploy(api, new_uri: str, t: Trained):
    from fakes import Clock

    table, test = _paths(t)
    clock = Clock()
    req = DeployRequest(
        new_uri, table, test, PublishConfig(model_name="churn"), DeployConfig(deploy=True)
    )
    logs: list[str] = []
    record = inference.deploy(
        ClusterConfig(), "run-1", req, api=api, poll_s=1, sleep=clock.sleep, now=clock.now,
        log=logs.append,
    )  # fmt: skip
    return record, logs


def test_the_cluster_deploy_creates_waits_and_smoke_tests(table_bundle, worse, s3_env):
    good = _on_s3(table_bundle.bundle, s3_env, "v-good")
    with served(table_bundle.bundle, "--model-name", "churn") as url:
        api = FakeIsvcApi(url)
        record, _ = _deploy(api, good, table_bundle)
        assert record["deployed"] and record["decision"]["deploy"]
        assert api.obj["metadata"]["annotations"][inference.BUNDLE_ANNOTATION] == good
        # the served model is now the champion: a worse challenger changes nothing
        bad = _on_s3(worse, s3_env, "v-worse")
        record, _ = _deploy(api, bad, table_bundle)
    assert not record["deployed"] and record["champion"] == good and len(api.writes) == 1


def test_a_failed_smoke_test_rolls_back_to_the_previous_spec(table_bundle, worse, s3_env):
    bad = _on_s3(worse, s3_env, "v-worse")
    good = _on_s3(table_bundle.bundle, s3_env, "v-good")
    previous = inference.inference_service(ClusterConfig(), "churn", bad)
    previous["metadata"].update(generation=1, resourceVersion="1")
    with served(worse, "--model-name", "churn") as url:  # the endpoint still answers as before
        api = FakeIsvcApi(url, existing=previous)
        with pytest.raises(KubetrainError, match="smoke test.*rolled back: the previous model"):
            _deploy(api, good, table_bundle)
    assert [w["metadata"]["annotations"][inference.BUNDLE_ANNOTATION] for w in api.writes] == [
        good,
        bad,
    ]
