"""KFP component: deploy the published bundle behind a champion/challenger check."""

from kfp.dsl import Artifact, Dataset, Input, Output

from kubetrain.components.common import component


@component
def deploy(
    bundle_uri: str,
    table: Input[Dataset],
    test: Input[Dataset],
    publish_uri: str,
    model_name: str,
    registry_url: str,
    deploy: bool,
    deploy_margin: float,
    serving_runtime: str,
    cluster: dict,
    run_id: str,
    record: Output[Artifact],
):
    """Score the new bundle and the served one on this run's raw test rows; if the new one
    wins, create or update the KServe InferenceService (a cluster run), wait for Ready
    and smoke-test it, rolling back on failure. Locally the decision is recorded."""
    from kubetrain.cluster.backends import deployer_for
    from kubetrain.config import RunConfig
    from kubetrain.stages import deploy_stage

    cfg = RunConfig.pick(locals())
    result = deploy_stage(
        bundle_uri,
        table.path,
        test.path,
        record.path,
        cfg.publish,
        cfg.deploy,
        deployer=deployer_for(cluster, run_id),
        run_id=run_id,
    )
    record.metadata.update({"deployed": result["deployed"], "reason": result["decision"]["reason"]})
