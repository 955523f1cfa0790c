"""Every random stream of a run, derived here from the run's one `seed`.

Each stream is a pure function of the seed and of where in the run it is drawn (round, step, epoch, optimiser
step), so a resumed run redraws what the uninterrupted run drew, and two streams never share a seed. The
formulas are the ones the code used before they were gathered here (2026-12-03), kept so that the same seed
still gives the same metrics:

    loop_seed               ((seed · 1000 + round) · 10000 + step) · 10 + stream   the round loop (Stream)
    worker_seed             loop seed · 1009 + worker index                         one rollout worker's share
    reward_training_seed    seed · 1000 + round (or epoch)                          the RM's batch order
    rounding_seed           seed · 1000003 + optimiser step                         MetaRM's stochastic rounding
    synthetic_seed          seed · 1000003 + stream                                 the synthetic task's data
    critic_init_seed        seed + 1                                                the critic's fresh head
    evaluation_seed         seed + 7919                                             `python -m rayrlhf.eval`'s samples

The run's seed itself seeds the policy's and the RM's initialisation, the initial RM training and the synthetic
task's prompts; inside a stream, an engine may offset per prompt or epoch (vLLM: seed + prompt index; an RM
epoch's shuffle: seed + epoch).
"""
from enum import IntEnum


class Stream(IntEnum):
    """The round loop's streams; the value keeps each apart within one (round, step)."""

    SFT_BATCHES = 1
    """The order of the SFT warm-up's (prompt, chosen) batches."""
    META_PROMPTS = 2
    """Which prompts the policy answers for a round's MetaRM meta data."""
    META_SAMPLING = 3
    """The policy's sampling of those meta responses."""
    PPO_PROMPTS = 4
    """Which prompts a PPO step's rollouts answer."""
    PPO_SAMPLING = 5
    """The policy's sampling of those rollouts."""
    PPO_UPDATE = 6
    """The PPO step's mini-batch shuffles."""
    HELD_OUT_JUDGING = 7
    """The held-out judging's samples of the initial and the current policy."""


def loop_seed(seed: int, stream: Stream, round_index: int = 0, step: int = 0) -> int:
    """The seed of `stream` at (round_index, step) of the round loop (round 0: before the first round)."""
    return ((seed * 1_000 + round_index) * 10_000 + step) * 10 + stream


def worker_seed(stage: int, worker_index: int) -> int:
    """Each rollout worker's generator seed within a stage (a loop_seed), apart from every other stage's seed."""
    return stage * 1009 + worker_index


def reward_training_seed(seed: int, index: int) -> int:
    """The reward model's batch order in round `index` of the loop, or epoch `index` of a Tune trial of the
    RM phase (seeded by the epoch alone, so a resumed trial trains later epochs as an uninterrupted one)."""
    return seed * 1000 + index


def rounding_seed(seed: int, global_step: int) -> int:
    """MetaRM's stochastic-rounding noise at an optimiser step: every rank draws the same, a resumed run too."""
    return seed * 1_000_003 + global_step


class SyntheticStream(IntEnum):
    """The synthetic task's data streams."""

    PREFERENCE_PAIRS = 1
    DRIFTED_PAIRS = 2
    DRIFTED_GROUPS = 3
    DEMONSTRATIONS = 4


def synthetic_seed(seed: int, stream: SyntheticStream) -> int:
    """The seed of one of the synthetic task's data streams (its prompts use the run's seed itself)."""
    return seed * 1_000_003 + stream


def critic_init_seed(seed: int) -> int:
    """The critic's initialisation (its value head apart from the RM's, which uses the seed itself)."""
    return seed + 1


def evaluation_seed(seed: int) -> int:
    """The held-out samples of `python -m rayrlhf.eval`: apart from every training stream."""
    return seed + 7_919
