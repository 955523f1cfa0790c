"""rayrlhf: Ray-distributed RLHF whose reward model is re-aligned to the policy each round (MetaRM)."""
__version__ = "0.1.0"
