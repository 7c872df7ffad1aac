"""Generation engine: paged KV cache, continuous batching, CFG image generation, understanding."""
from janus_rt.engine.background import BackgroundEngine
from janus_rt.engine.engine import Engine, EngineStats
from janus_rt.engine.request import Request, SamplingParams

__all__ = ["BackgroundEngine", "Engine", "EngineStats", "Request", "SamplingParams"]
