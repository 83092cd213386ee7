"""Moved to `efficient_train.tools.hf`; this name keeps old imports working and says so once."""
import warnings

from efficient_train.tools.hf import *  # noqa: F401,F403
from efficient_train.tools.hf import __all__  # noqa: F401

warnings.warn("efficient_train.hf moved to efficient_train.tools.hf; import it from there", DeprecationWarning,
              stacklevel=2)
