"""The in-process engine: `from services.engine import LLM, SamplingParams`."""

from services.engine.engine_core import EngineCore
from services.engine.llm import LLM
from services.engine.outputs import CompletionOutput, RequestOutput
from shared.sampling_params import SamplingParams
from shared.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "EngineCore",
    "RequestOutput",
    "CompletionOutput",
]
