"""The paged serving engine: continuous batching over a block pool, compressed by kvslim methods."""
from .block_manager import BlockManager
from .llm import LLM
from .llm_engine import LLMEngine, StepFailed
from .outputs import Completion, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import RequestTooLarge

__all__ = ["LLM", "BlockManager", "Completion", "LLMEngine", "RequestOutput", "RequestTooLarge", "SamplingParams", "StepFailed"]
