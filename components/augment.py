"""KFP component: augment."""

from kfp.dsl import HTML, Dataset, Input, Output

from kubetrain.components.common import component


@component
def augment(
    train: Input[Dataset],
    augment_copies: int,
    max_shift: int,
    max_rotation: float,
    flip_horizontal: bool,
    flip_vertical: bool,
    noise_std: float,
    brightness: float,
    oversample: bool,
    seed: int,
    augmented: Output[Dataset],
    report: Output[HTML],
):
    """Augment the training split only: image warps/noise, or table oversampling/jitter."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import augment_stage, compact

    cfg = RunConfig.pick(locals())
    augmented.metadata.update(
        compact(augment_stage(train.path, augmented.path, report.path, cfg.augment, cfg.seed))
    )
