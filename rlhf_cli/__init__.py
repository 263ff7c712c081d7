"""rlhf: SFT, reward models, PPO and DPO with LoRA adapters."""
__version__ = "0.1.0"
