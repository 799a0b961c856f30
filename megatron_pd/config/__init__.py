"""Typed run configuration: schema, presets, loading with overrides, resolved dumps."""

from megatron_pd.config.loader import load_config, save_config
from megatron_pd.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_config",
    "save_config",
]
