"""Mixture-of-experts adapters; importing this package registers them."""

from loraforge.methods.moe.mixlora import MixLoRAFFN, MixLoRAOptions, attach_mixlora, expert_load

__all__ = ["MixLoRAFFN", "MixLoRAOptions", "attach_mixlora", "expert_load"]
