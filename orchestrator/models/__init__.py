from orchestrate.models.llama import Llama, LlamaConfig, build_llama, cross_entropy_loss

__all__ = ["Llama", "LlamaConfig", "build_llama", "cross_entropy_loss"]
