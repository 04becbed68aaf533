"""Config schemas and validation, run before anything is built."""

from moe_plugin.config.validate import ConfigError, validate_config

__all__ = ["ConfigError", "validate_config"]
