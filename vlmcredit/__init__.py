"""vlmcredit: attention-connectivity analysis of Qwen-VL models for RL credit assignment."""

from vlmcredit.errors import VlmCreditError

__version__ = "0.1.0"

__all__ = ["VlmCreditError", "__version__"]
