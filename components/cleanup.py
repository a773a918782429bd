"""KFP component: the exit handler's task (cluster pipelines only)."""

from kfp import dsl

from kubetrain.components.common import component


@component
def cleanup(cluster: dict, run_id: str, status: dsl.PipelineTaskFinalStatus) -> dict:
    """Delete what a failed or cancelled run left behind (Katib, TrainJob); notify a webhook."""
    from kubetrain.cluster.cleanup import clean_up
    from kubetrain.config.cluster import ClusterConfig

    return clean_up(
        run_id, ClusterConfig.from_dict(cluster), status.state, status.error_message or ""
    )
