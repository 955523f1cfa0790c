"""The math of MetaRM and PPO as pure functions of tensors and scalars (no Ray, no config objects)."""
