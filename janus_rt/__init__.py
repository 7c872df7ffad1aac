"""janus_rt: a lean, fast runtime for DeepSeek Janus-Pro."""
from janus_rt.config import JanusConfig, preset
from janus_rt.models.janus import Janus

__all__ = ["Janus", "JanusConfig", "preset"]
__version__ = "0.1.0"
