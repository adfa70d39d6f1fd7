from .adamae import AdaMAE, AdaMAEConfig, AdaMAEOutput
from .registry import build_model, config_for, make_config, model_names

__all__ = ["AdaMAE", "AdaMAEConfig", "AdaMAEOutput", "build_model", "config_for", "make_config", "model_names"]
