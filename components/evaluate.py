"""KFP component: evaluate (and the quality gate's verdict)."""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kubetrain.components.common import component


@component
def evaluate(
    trained_model: Input[Model],
    test: Input[Dataset],
    tuning: dict,
    min_accuracy: float,
    min_r2: float,
    max_gap_to_baseline: float,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
    report: Output[HTML],
) -> NamedTuple("Verdict", [("gate", str), ("score", float)]):
    """Test-split metrics, confusion matrix and ROC (a regression: R^2, RMSE, MAE) for the
    Kubeflow UI; gate pass/fail, and the score it judged (accuracy or R^2)."""
    import json

    from kubetrain.config import RunConfig
    from kubetrain.stages import evaluate_stage

    cfg = RunConfig.pick(locals())
    result = evaluate_stage(
        trained_model.path, test.path, evaluation.path, report.path, cfg.gate, tuning
    )
    regression = result.get("task") == "regression"
    score = "r2" if regression else "accuracy"
    shown = (
        ("r2", "rmse", "mae")
        if regression
        else ("accuracy", "macro_f1", "precision_macro", "recall_macro", "roc_auc")
    )
    for name in shown:
        if result[name] is not None:  # roc_auc needs two classes in the test split
            metrics.log_metric(name, float(result[name]))
    for name, value in result.get("cross_validation", {}).items():  # K-fold mean and std
        if name.endswith(("_mean", "_std")):
            metrics.log_metric(f"cv_{name}", float(value))
    if "challenger" in result:  # the gradient-boosting challenger the train stage saved
        metrics.log_metric(f"challenger_{score}", float(result["challenger"][score]))
        metrics.log_metric("gap_to_challenger", float(result["gap_to_challenger"]))
    if not regression:  # a regression has no classes: the report plots its fit instead
        classification.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
        roc = result["roc"]["micro"]
        classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    # kfp.local caches only outputs that exist as files; Metrics write none by themselves.
    for artifact in (metrics, classification):
        with open(artifact.path, "w") as f:
            json.dump(artifact.metadata, f)
    evaluation.metadata.update({"gate": result["gate"], score: result[score]})
    return (result["gate"], result[score])
