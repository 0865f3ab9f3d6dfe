"""Typed pipeline configuration: one YAML file describes a dataset and every stage that runs on it.

Each package's settings live in their own module (``data``: dataset, fetch, prepare; ``features``;
``model``: graphs and models; ``training``: train, eval; ``operations``: publish, orchestration);
``loading`` composes them into :class:`PipelineConfig` and reads YAML, overlays and overrides.
"""

from diffcl.core.config.base import (
    MODALITY_NAME,
    Choice,
    ConfigError,
    IntRange,
    LogUniform,
    Modality,
    SearchParam,
    SearchSpace,
    check_modality_name,
)
from diffcl.core.config.data import (
    DATASET_LOCATION_FIELDS,
    PRESET_NAMES,
    Columns,
    DatasetConfig,
    FetchConfig,
    PrepareConfig,
)
from diffcl.core.config.features import (
    ENCODED_MODALITIES,
    FeaturesConfig,
    ImageFeaturesConfig,
    TextFeaturesConfig,
)
from diffcl.core.config.loading import (
    PipelineConfig,
    apply_overrides,
    deep_merge,
    dump_config,
    load_config,
    overlay_overrides,
    parse_override,
    read_overlay,
)
from diffcl.core.config.model import (
    DEFAULT_MODALITY_WEIGHTS,
    SHARED_SEARCH_SPACE,
    DiffCLConfig,
    DiffusionSettings,
    FreedomConfig,
    GraphsConfig,
    LightGCNConfig,
    MFConfig,
    ModelConfig,
    model_names,
    search_space,
)
from diffcl.core.config.operations import OrchestrationConfig, PublishConfig
from diffcl.core.config.reference import REQUIRED, ConfigKey, config_keys, keys_under
from diffcl.core.config.training import (
    RESULT_NEUTRAL_TRAIN_FIELDS,
    TRAINING_SECTIONS,
    EvalConfig,
    TrainConfig,
)

__all__ = [
    "Choice",
    "Columns",
    "ConfigKey",
    "ConfigError",
    "DATASET_LOCATION_FIELDS",
    "DEFAULT_MODALITY_WEIGHTS",
    "DatasetConfig",
    "DiffCLConfig",
    "DiffusionSettings",
    "ENCODED_MODALITIES",
    "EvalConfig",
    "FeaturesConfig",
    "FetchConfig",
    "FreedomConfig",
    "GraphsConfig",
    "ImageFeaturesConfig",
    "IntRange",
    "LightGCNConfig",
    "LogUniform",
    "MFConfig",
    "MODALITY_NAME",
    "Modality",
    "ModelConfig",
    "OrchestrationConfig",
    "PRESET_NAMES",
    "PipelineConfig",
    "PrepareConfig",
    "PublishConfig",
    "REQUIRED",
    "RESULT_NEUTRAL_TRAIN_FIELDS",
    "SHARED_SEARCH_SPACE",
    "SearchParam",
    "SearchSpace",
    "TRAINING_SECTIONS",
    "TextFeaturesConfig",
    "TrainConfig",
    "apply_overrides",
    "check_modality_name",
    "config_keys",
    "deep_merge",
    "dump_config",
    "keys_under",
    "load_config",
    "model_names",
    "overlay_overrides",
    "parse_override",
    "read_overlay",
    "search_space",
]
