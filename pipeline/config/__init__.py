"""The pipeline config: the schema (one strict pydantic model per section), loading with ``--set`` overrides, and the
shipped presets (``presets/*.yaml``). Light: imports no torch, Ray or MLflow."""
from .loading import (
                      CONFIG_DIR,
                      ConfigError,
                      apply_overrides,
                      available_configs,
                      dump_yaml,
                      flatten,
                      from_dict,
                      load_config,
                      resolve_config_path,
                      to_dict,
)
from .schema import PipelineConfig

__all__ = ["CONFIG_DIR", "ConfigError", "PipelineConfig", "apply_overrides", "available_configs", "dump_yaml",
           "flatten", "from_dict", "load_config", "resolve_config_path", "to_dict"]
