"""vmatdose: config-composed deep-learning dose prediction for radiotherapy."""

from vmatdose import config as _config  # noqa: F401  (registers OmegaConf resolvers)
from vmatdose.data import input_spec as _input_spec

_input_spec.register_resolver()  # vmatdose.input_channels

__version__ = "0.1.0"
