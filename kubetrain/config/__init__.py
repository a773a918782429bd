"""Typed settings parsed once per process: run settings by concern, and cluster placement."""

from kubetrain.config.settings import (
    AugmentConfig,
    CleanConfig,
    CompressConfig,
    DataConfig,
    DeployConfig,
    FinalConfig,
    GateConfig,
    HyperConfig,
    PublishConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "AugmentConfig",
    "CleanConfig",
    "CompressConfig",
    "DataConfig",
    "DeployConfig",
    "FinalConfig",
    "GateConfig",
    "HyperConfig",
    "PublishConfig",
    "RunConfig",
    "TrainConfig",
    "TuneConfig",
]
