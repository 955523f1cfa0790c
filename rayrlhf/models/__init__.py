"""Policy, reference, critic and reward models built from a ModelSpec, and saved back as transformers folders."""
