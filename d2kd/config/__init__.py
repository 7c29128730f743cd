from .defaults import add_d2kd_config, register_config_extension
from .loading import ConfigError, get_d2kd_cfg, load_config
from .validation import check_inputs

__all__ = ["add_d2kd_config", "check_inputs", "ConfigError", "get_d2kd_cfg", "load_config",
           "register_config_extension"]
