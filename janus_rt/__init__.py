"""janus_rt: a lean, fast runtime for DeepSeek Janus-Pro."""
from janus_rt import openmp

openmp.apply()  # before torch loads libgomp (see openmp.py)

from janus_rt.config import JanusConfig, preset  # noqa: E402
from janus_rt.models.janus import Janus  # noqa: E402

openmp.settle()  # libgomp has read it: child processes get the user's environment

__all__ = ["Janus", "JanusConfig", "preset"]
__version__ = "0.1.0"
