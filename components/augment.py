"""KFP component: augment."""

from kfp.dsl import HTML, Dataset, Input, Output

from kubetrain.components.common import component


@component
def augment(
    train: Input[Dataset],
    augment_copies: int,
    crop_area: float,
    max_rotation: float,
    flip: str,
    flip_vertical: bool,
    brightness: float,
    contrast: float,
    saturation: float,
    cutout: float,
    mixup: float,
    cutmix: float,
    noise_std: float,
    oversample: bool,
    seed: int,
    augmented: Output[Dataset],
    report: Output[HTML],
):
    """Augment the training split only: tables get oversampling/jitter; for images the
    policy that training applies per batch is recorded (and shown), nothing is copied."""
    from kubetrain.config import RunConfig
    from kubetrain.stages import augment_stage, compact

    cfg = RunConfig.pick(locals())
    augmented.metadata.update(
        compact(augment_stage(train.path, augmented.path, report.path, cfg.augment, cfg.seed))
    )
