"""vmatdose: config-composed deep-learning dose prediction for radiotherapy."""

from vmatdose import config as _config  # noqa: F401  (registers OmegaConf resolvers)

__version__ = "0.1.0"
