"""Champion/challenger on real bundles: both score the same raw held-out rows.

`kubetrain.assessment.champion` decides on numbers; this module gets them: the new
bundle (challenger) and the served one (champion) each predict the run's raw test rows
(`kubetrain.serving.heldout`) through their own preprocessor and network, as they would
behind the endpoint, so a champion fitted on older data is judged on the new split as
it would serve it. Locally, "served" is the previously published version of the model
(`previous_version`): there is no endpoint, so the decision is recorded, not acted on.
"""

from __future__ import annotations

from typing import Any

from kubetrain.assessment.champion import Decision, decide, objective_for, objective_value
from kubetrain.core.errors import KubetrainError
from kubetrain.serving.heldout import Heldout
from kubetrain.serving.predictor import Predictor


def score(predictor: Predictor, heldout: Heldout, metric: str) -> float:
    """``metric`` of ``predictor`` on the held-out raw rows (a schema violation raises)."""
    result = predictor.predict_rows(heldout.rows)
    predicted: Any = result.values.tolist() if result.values is not None else result.labels
    return objective_value(metric, heldout.truth, predicted)


def challenge(
    challenger: Predictor, champion: Predictor | None, heldout: Heldout, margin: float = 0.0
) -> Decision:
    """The decision for ``challenger`` against ``champion`` (None: nothing served yet)."""
    metric = objective_for(challenger.schema.task)
    new = score(challenger, heldout, metric)
    if champion is None:
        return decide(metric, new, None, margin)
    if champion.schema.task != challenger.schema.task:
        return decide(
            metric, new, None, margin, champion_error=f"it is a {champion.schema.task} model"
        )
    try:
        old = score(champion, heldout, metric)
    except KubetrainError as exc:  # RowError: the columns changed under the champion
        return decide(metric, new, None, margin, champion_error=str(exc).splitlines()[0])
    return decide(metric, new, old, margin)


def previous_version(publish_uri: str, model_name: str, current: str) -> str | None:
    """The URI of the newest complete version of the model other than ``current``."""
    from kubetrain.assessment.publish import published_versions

    name = current.rstrip("/").rsplit("/", 1)[-1]
    versions = [v for v in published_versions(publish_uri, model_name) if v != name]
    return f"{publish_uri.rstrip('/')}/{model_name}/{versions[-1]}/" if versions else None


def load_bundle(uri: str, runtime: str) -> Predictor:
    """The bundle at ``uri`` (folder or s3://, checked against its manifest), loaded."""
    from kubetrain.serving.bundle import open_bundle

    return Predictor(open_bundle(uri), runtime)


def load(
    bundle_uri: str, table_path: str, test_path: str, runtime: str
) -> tuple[Predictor, Heldout]:
    """The new bundle and the raw rows of its run's test split (`heldout_rows`)."""
    from kubetrain.serving.heldout import heldout_rows

    predictor = load_bundle(bundle_uri, runtime)
    return predictor, heldout_rows(predictor, table_path, test_path)
