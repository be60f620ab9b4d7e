"""fieldkit: fine-tuning primitives for hand-written PPO / GRPO / DPO / SFT loops."""

__version__ = "0.1.0"
