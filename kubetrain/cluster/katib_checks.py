"""What Katib accepts: its API's names and the checks its admission webhook makes.

Katib's CRD carries no OpenAPI schema: its admission webhook validates an
Experiment, and the suggestion service validates the algorithm settings only
after the Experiment exists. `validate` repeats those checks here (read from
Katib's `pkg/webhook/v1beta1/experiment/validator/validator.go` and the
suggestion services' `ValidateAlgorithmSettings`), so a bad Experiment fails
at compile/submit time on a laptop, not minutes into a cluster run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from kubetrain.config.settings import TUNE_ALGORITHMS
from kubetrain.core.errors import KubetrainError
from kubetrain.training import tuning

GROUP, VERSION = "kubeflow.org", "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"

#: Settings each algorithm's suggestion service accepts, per Katib's default
#: katib-config: random and tpe are served by hyperopt (which rejects any other
#: name, n_startup_trials included), multivariate-tpe and grid by optuna, cmaes
#: and sobol by goptuna (sobol reads none), bayesianoptimization by skopt.
ALGORITHM_SETTINGS: dict[str, frozenset[str]] = {
    "random": frozenset({"random_state"}),
    "tpe": frozenset({"random_state", "gamma", "prior_weight", "n_EI_candidates"}),
    "multivariate-tpe": frozenset({"random_state", "n_startup_trials", "n_ei_candidates"}),
    "grid": frozenset({"random_state"}),
    "cmaes": frozenset({"random_state", "sigma", "restart_strategy"}),
    "sobol": frozenset(),
    "bayesianoptimization": frozenset(
        {"random_state", "n_initial_points", "base_estimator", "acq_func", "acq_optimizer"}
    ),
}
_INT_SETTINGS = {
    "random_state",
    "n_startup_trials",
    "n_ei_candidates",
    "n_EI_candidates",
    "n_initial_points",
    "min_trials_required",
    "start_step",
}
EARLY_STOPPING = {"medianstop": frozenset(tuning.MEDIANSTOP)}
GOAL_TYPES = ("minimize", "maximize")
METRIC_STRATEGIES = ("min", "max", "latest")
RESUME_POLICIES = ("Never", "LongRunning", "FromVolume")
PARAMETER_TYPES = ("int", "double", "categorical", "discrete")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
COLLECTOR_KINDS = (
    "StdOut",
    "File",
    "TensorFlowEvent",
    "PrometheusMetric",
    "Custom",
    "None",
    "Push",
)
#: Suggestion Service "<experiment>-<algorithm>" must be a 63-character DNS label and
#: trial Job names are "<experiment>-<8 chars>": 40 leaves room for both.
MAX_NAME = 40
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_PLACEHOLDER = re.compile(r"\$\{trialParameters\.([^}]*)\}")
#: Katib's StdOut collector joins command and args with spaces into `sh -c`, so
#: every argument must survive the shell unquoted.
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def grid_size(params: list[dict[str, Any]]) -> int:
    """How many points Katib's grid (optuna's GridSampler) can visit."""
    total = 1
    for p in params:
        fs = p.get("feasibleSpace") or {}
        if fs.get("list"):
            total *= len(fs["list"])
        else:
            lo, hi, step = float(fs["min"]), float(fs["max"]), float(fs["step"])
            total *= int(math.floor((hi - lo) / step + 1e-9)) + 1
    return total


def _is_int(text: Any) -> bool:
    return isinstance(text, str) and re.fullmatch(r"[+-]?\d+", text.strip()) is not None


def _is_number(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_settings(
    where: str, settings: Any, allowed: frozenset[str], algorithm: str, problems: list[str]
) -> None:
    for s in settings or []:
        name, value = s.get("name"), s.get("value")
        if name not in allowed:
            problems.append(
                f"{where}: setting {name!r} is not accepted by Katib's {algorithm} "
                f"service (accepted: {', '.join(sorted(allowed)) or 'none'})"
            )
        elif not isinstance(value, str):
            problems.append(f"{where}: setting {name} must be a string, got {value!r}")
        elif name in _INT_SETTINGS and not (_is_int(value) and int(value) >= 0):
            problems.append(f"{where}: setting {name}={value!r} must be a whole number >= 0")


def _check_counts(spec: Mapping[str, Any], problems: list[str]) -> None:
    counts = {
        k: spec.get(k) for k in ("maxTrialCount", "parallelTrialCount", "maxFailedTrialCount")
    }
    for key, value in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            problems.append(f"spec.{key} must be an integer, got {value!r}")
            return
    most, parallel, failed = counts.values()
    if most is not None and most <= 0:
        problems.append(f"spec.maxTrialCount must be greater than 0, got {most}")
    if parallel is not None and parallel <= 0:
        problems.append(f"spec.parallelTrialCount must be greater than 0, got {parallel}")
    if failed is not None and failed < 0:
        problems.append(f"spec.maxFailedTrialCount must not be negative, got {failed}")
    if most is not None and parallel is not None and parallel > most:
        problems.append(
            f"spec.parallelTrialCount ({parallel}) must not exceed spec.maxTrialCount ({most})"
        )
    if most is not None and failed is not None and failed > most:
        problems.append(
            f"spec.maxFailedTrialCount ({failed}) must not exceed spec.maxTrialCount ({most})"
        )


def _check_objective(obj: Any, problems: list[str]) -> None:
    if not isinstance(obj, Mapping):
        problems.append("spec.objective must be specified")
        return
    if obj.get("type") not in GOAL_TYPES:
        problems.append(
            f"spec.objective.type {obj.get('type')!r} is unknown; use {' or '.join(GOAL_TYPES)}"
        )
    name = obj.get("objectiveMetricName")
    if not name:
        problems.append("spec.objective.objectiveMetricName must be specified")
    if name in (obj.get("additionalMetricNames") or []):
        problems.append(
            f"spec.objective.additionalMetricNames must not contain the objective metric {name!r}"
        )
    known = {name, *(obj.get("additionalMetricNames") or [])}
    for s in obj.get("metricStrategies") or []:
        if s.get("value") not in METRIC_STRATEGIES:
            problems.append(
                f"spec.objective.metricStrategies: {s.get('value')!r} for "
                f"{s.get('name')} is unknown; use {', '.join(METRIC_STRATEGIES)}"
            )
        if s.get("name") not in known:
            problems.append(
                f"spec.objective.metricStrategies names {s.get('name')!r}, "
                "which is neither the objective nor an additional metric"
            )


def _check_parameter(i: int, p: Mapping[str, Any], problems: list[str]) -> None:
    where = f"spec.parameters[{i}] ({p.get('name')})"
    kind, fs = p.get("parameterType"), p.get("feasibleSpace")
    if kind not in PARAMETER_TYPES:
        problems.append(
            f"{where}: parameterType {kind!r} is not supported; use {', '.join(PARAMETER_TYPES)}"
        )
    if not isinstance(fs, Mapping) or not fs:
        problems.append(f"{where}: feasibleSpace must be specified")
        return
    for key in ("min", "max", "step", "distribution"):
        if key in fs and not isinstance(fs[key], str):
            problems.append(
                f"{where}: feasibleSpace.{key} must be a string (Katib types it "
                f"string; quote it in YAML), got {type(fs[key]).__name__} "
                f"{fs[key]!r}"
            )
    values = fs.get("list")
    if values is not None and (
        not isinstance(values, list) or not all(isinstance(v, str) for v in values)
    ):
        problems.append(
            f"{where}: feasibleSpace.list must be a list of strings (quote numbers "
            f"in YAML), got {values!r}"
        )
    if "distribution" in fs and fs["distribution"] not in DISTRIBUTIONS:
        problems.append(
            f"{where}: distribution {fs['distribution']!r} is not supported; use "
            f"{', '.join(DISTRIBUTIONS)}"
        )
    if kind in ("int", "double"):
        if values:
            problems.append(
                f"{where}: feasibleSpace.list is not supported for "
                f"parameterType {kind}; use min/max"
            )
        if "min" not in fs or "max" not in fs:
            problems.append(
                f"{where}: feasibleSpace.min and max must be specified for parameterType {kind}"
            )
            return
        parse = _is_int if kind == "int" else _is_number
        bad = [k for k in ("min", "max", "step") if k in fs and not parse(fs[k])]
        if any(not isinstance(fs[k], str) for k in bad):
            return  # reported above as "must be a string"
        if bad:
            problems.append(
                f"{where}: feasibleSpace.{bad[0]}={fs[bad[0]]!r} is not "
                f"{'an integer' if kind == 'int' else 'a number'}"
            )
            return
        lo, hi = float(fs["min"]), float(fs["max"])
        if lo >= hi:
            problems.append(
                f"{where}: feasibleSpace.min ({fs['min']}) must be below max ({fs['max']})"
            )
        if "step" in fs and float(fs["step"]) <= 0:
            problems.append(f"{where}: feasibleSpace.step must be positive")
        if fs.get("distribution") in ("logUniform", "logNormal") and lo <= 0:
            problems.append(f"{where}: a {fs['distribution']} range needs min > 0")
    elif kind in ("categorical", "discrete"):
        if any(k in fs for k in ("min", "max", "step")):
            problems.append(
                f"{where}: feasibleSpace min/max/step are not supported for "
                f"parameterType {kind}; use list"
            )
        if not values:
            problems.append(f"{where}: feasibleSpace.list must hold at least one value")


def _check_algorithm(spec: Mapping[str, Any], problems: list[str]) -> None:
    algorithm = spec.get("algorithm")
    if not isinstance(algorithm, Mapping) or not algorithm.get("algorithmName"):
        problems.append("spec.algorithm.algorithmName must be specified")
        return
    name = algorithm["algorithmName"]
    if name not in TUNE_ALGORITHMS:
        problems.append(
            f"spec.algorithm.algorithmName {name!r} is unknown; use one of "
            f"{', '.join(TUNE_ALGORITHMS)}"
        )
        return
    _check_settings(
        "spec.algorithm",
        algorithm.get("algorithmSettings"),
        ALGORITHM_SETTINGS[name],
        name,
        problems,
    )
    params = [p for p in spec.get("parameters") or [] if isinstance(p, Mapping)]
    if name == "cmaes" and sum(p.get("parameterType") in ("int", "double") for p in params) < 2:
        problems.append(
            "cmaes needs at least two int/double parameters (Katib's goptuna "
            "service refuses a smaller continuous space)"
        )
    if name == "grid":
        unbounded = [
            p.get("name")
            for p in params
            if p.get("parameterType") == "double" and "step" not in (p.get("feasibleSpace") or {})
        ]
        if unbounded:
            problems.append(
                f"grid needs a step or a list for every double parameter; "
                f"{', '.join(map(str, unbounded))} has neither"
            )
        elif params and isinstance(spec.get("maxTrialCount"), int):
            try:
                size = grid_size(params)
            except (KeyError, TypeError, ValueError):
                return  # the parameter checks report the malformed feasible space
            if spec["maxTrialCount"] > size:
                problems.append(
                    f"grid has {size} points but spec.maxTrialCount is "
                    f"{spec['maxTrialCount']}; Katib's grid service refuses that"
                )


def _check_template(spec: Mapping[str, Any], problems: list[str]) -> None:
    tt = spec.get("trialTemplate")
    if not isinstance(tt, Mapping):
        problems.append("spec.trialTemplate must be specified")
        return
    if not tt.get("primaryContainerName"):
        problems.append("spec.trialTemplate.primaryContainerName must be specified")
    if not tt.get("successCondition") or not tt.get("failureCondition"):
        problems.append(
            "spec.trialTemplate successCondition and failureCondition must be specified"
        )
    trial_spec = tt.get("trialSpec")
    if not isinstance(trial_spec, Mapping):
        problems.append("spec.trialTemplate.trialSpec must be specified")
        return
    text = json.dumps(trial_spec)
    names = [p.get("name") for p in spec.get("parameters") or []]
    seen_names: set[str] = set()
    seen_refs: set[str] = set()
    for i, tp in enumerate(tt.get("trialParameters") or []):
        name, ref = tp.get("name"), tp.get("reference")
        if not name or not ref or "{" in name or "}" in name:
            problems.append(
                f"spec.trialTemplate.trialParameters[{i}]: name and reference "
                "must be specified and the name must not contain '{' or '}'"
            )
            continue
        if name in seen_names or ref in seen_refs:
            problems.append(
                f"spec.trialTemplate.trialParameters[{i}]: {name}/{ref} is defined twice"
            )
            continue
        seen_names.add(name)
        seen_refs.add(ref)
        if ref not in names and not ref.startswith("${trialSpec."):
            problems.append(
                f"trial parameter {name} references {ref!r}, which is not in "
                f"spec.parameters ({', '.join(map(str, names))})"
            )
        if f"${{trialParameters.{name}}}" not in text:
            problems.append(f"trial parameter {name} is never used in the trial template")
    undefined = sorted(set(_PLACEHOLDER.findall(text)) - seen_names)
    if undefined:
        problems.append(
            "the trial template uses undefined trial parameter(s) "
            + ", ".join(f"${{trialParameters.{u}}}" for u in undefined)
            + "; define them in spec.trialTemplate.trialParameters"
        )
    if not trial_spec.get("apiVersion") or not trial_spec.get("kind"):
        problems.append("spec.trialTemplate.trialSpec needs apiVersion and kind")
    meta = trial_spec.get("metadata") or {}
    if meta.get("name") or meta.get("namespace"):
        problems.append("spec.trialTemplate.trialSpec must not set metadata.name or namespace")
    if (trial_spec.get("apiVersion"), trial_spec.get("kind")) == ("batch/v1", "Job"):
        pod = ((trial_spec.get("spec") or {}).get("template") or {}).get("spec") or {}
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            problems.append("the trial Job's pod restartPolicy must be Never or OnFailure")
        containers = {c.get("name"): c for c in pod.get("containers") or []}
        primary = containers.get(tt.get("primaryContainerName"))
        if primary is None:
            problems.append(
                f"the trial Job has no container named "
                f"{tt.get('primaryContainerName')!r} (primaryContainerName)"
            )
        else:
            for arg in list(primary.get("command") or []) + list(primary.get("args") or []):
                if not _SHELL_SAFE.fullmatch(_PLACEHOLDER.sub("x", str(arg))):
                    problems.append(
                        f"trial argument {arg!r} is not shell-safe: Katib's "
                        "StdOut collector runs the command through `sh -c`"
                    )
                    break


def _check_model(exp: Mapping[str, Any], problems: list[str]) -> None:
    """Validate against Katib's generated pydantic models and demand a lossless round trip."""
    from kubeflow_katib_api.models import V1beta1Experiment
    from pydantic import ValidationError

    try:
        model = V1beta1Experiment.model_validate(exp)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        problems.append(f"Katib API model rejects {where}: {err['msg']} (got {err.get('input')!r})")
        return
    back = model.to_dict()
    if back != json.loads(json.dumps(exp)):
        problems.append(
            f"field {_first_difference(exp, back)} is not part of Katib's "
            "Experiment API (lost in a round trip through kubeflow-katib-api)"
        )


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}".lstrip(".")
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path.lstrip(".") or "<root>"


def problems_of(exp: Mapping[str, Any]) -> list[str]:
    """Everything Katib's webhook (and its suggestion services) would refuse in `exp`."""
    problems: list[str] = []
    if exp.get("apiVersion") != API_VERSION or exp.get("kind") != "Experiment":
        problems.append(
            f"not a Katib Experiment: apiVersion {exp.get('apiVersion')!r}, "
            f"kind {exp.get('kind')!r} (want {API_VERSION}, Experiment)"
        )
    name = str((exp.get("metadata") or {}).get("name") or "")
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        problems.append(
            f"Experiment name {name!r} must be lower-case letters, digits and "
            f"'-', start with a letter, end with a letter or digit, and be at "
            f"most {MAX_NAME} characters"
        )
    spec = exp.get("spec")
    if not isinstance(spec, Mapping):
        return problems + ["spec must be specified"]
    _check_counts(spec, problems)
    _check_objective(spec.get("objective"), problems)
    _check_algorithm(spec, problems)
    early = spec.get("earlyStopping")
    if early is not None:
        name = early.get("algorithmName")
        if name not in EARLY_STOPPING:
            problems.append(
                f"spec.earlyStopping.algorithmName {name!r} is unknown; use "
                f"{', '.join(EARLY_STOPPING)} or leave earlyStopping out"
            )
        else:
            _check_settings(
                "spec.earlyStopping",
                early.get("algorithmSettings"),
                EARLY_STOPPING[name],
                name,
                problems,
            )
    if spec.get("resumePolicy", "Never") not in RESUME_POLICIES + ("",):
        problems.append(
            f"spec.resumePolicy {spec.get('resumePolicy')!r} is unknown; use "
            f"{', '.join(RESUME_POLICIES)}"
        )
    params = spec.get("parameters") or []
    if not params:
        problems.append("spec.parameters must list at least one parameter")
    names = [p.get("name") for p in params]
    if len(set(names)) != len(names):
        problems.append(f"spec.parameters names must be unique, got {names}")
    for i, p in enumerate(params):
        _check_parameter(i, p, problems)
    _check_template(spec, problems)
    kind = ((spec.get("metricsCollectorSpec") or {}).get("collector") or {}).get("kind", "StdOut")
    if kind not in COLLECTOR_KINDS:
        problems.append(
            f"spec.metricsCollectorSpec.collector.kind {kind!r} is unknown; use "
            f"{', '.join(COLLECTOR_KINDS)}"
        )
    _check_model(exp, problems)
    return problems


def validate(exp: Mapping[str, Any]) -> None:
    """Raise one KubetrainError line listing what Katib would reject, else return."""
    problems = problems_of(exp)
    if problems:
        name = (exp.get("metadata") or {}).get("name", "?")
        raise KubetrainError(f"invalid Katib Experiment {name}: " + "; ".join(problems))
