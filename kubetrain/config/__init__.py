"""Typed settings, parsed once at each process boundary: run settings by concern, and cluster placement."""

from kubetrain.config.settings import (
    AugmentConfig,
    CleanConfig,
    CompressConfig,
    DataConfig,
    FinalConfig,
    GateConfig,
    HyperConfig,
    PublishConfig,
    RunConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = ["AugmentConfig", "CleanConfig", "CompressConfig", "DataConfig", "FinalConfig",
           "GateConfig", "HyperConfig", "PublishConfig", "RunConfig", "TrainConfig",
           "TuneConfig"]
