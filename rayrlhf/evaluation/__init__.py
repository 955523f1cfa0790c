"""Judging what a run made, in one process without Ray: policies against the initial one (win / tie / lose by a
judge), diversity, KL, reward-model accuracy on named sets, and the reward-difference distribution per round."""
