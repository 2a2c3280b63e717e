"""Typed run configuration: YAML file, then dotted ``key=value`` overrides, validated at start.

schema.py      the dataclasses: one per section, one typed field with a default per knob
loading.py     YAML + overrides, each value checked against its field's type (``load_config``)
validation.py  checks across fields that need nothing but the config

The ground floor of the framework: it imports no other framework module. Checks that need a
concern's knowledge (the NVMe tier, pipeline stages) live with the concern and run when the run is
assembled (``framework.state.check_run``). Errors are one line; scripts exit 2 on them.
"""
from framework.config.loading import config_to_dict, load_config, parse_override
from framework.config.schema import (DTYPES, HOST_OPTIMIZERS, TOKEN_METADATA, TRACKERS, VOCAB_MULTIPLE, BroadcastConfig,
                                     CheckpointConfig, Config, ConfigError, DataConfig, ElasticConfig, LoggingConfig,
                                     MemoryConfig, MeshConfig, ModelConfig, MoEConfig,
                                      OptimizerConfig, ShardingConfig, TrainConfig)
from framework.config.validation import warnings

