"""rayrlhf/seeds.py: every stream's seed by hand (the formulas the code used before they were gathered, so the
same seed gives the same metrics), and no two of a run's loop streams sharing a seed."""
import itertools

from rayrlhf.seeds import (Stream, SyntheticStream, critic_init_seed, evaluation_seed, loop_seed, reward_training_seed,
                           rounding_seed, synthetic_seed, worker_seed)


def test_each_stream_by_hand():
    assert loop_seed(3, Stream.PPO_UPDATE, 2, 5) == ((3 * 1000 + 2) * 10000 + 5) * 10 + 6 == 300_200_056
    assert loop_seed(0, Stream.SFT_BATCHES) == 1 and loop_seed(1, Stream.HELD_OUT_JUDGING) == 100_000_007
    assert worker_seed(300_200_056, 2) == 300_200_056 * 1009 + 2
    assert reward_training_seed(4, 7) == 4007 and rounding_seed(2, 11) == 2_000_017
    assert synthetic_seed(1, SyntheticStream.DRIFTED_GROUPS) == 1_000_006
    assert critic_init_seed(5) == 6 and evaluation_seed(5) == 7_924


def test_the_loop_streams_of_a_run_never_share_a_seed():
    seeds = [loop_seed(9, stream, round_index, step)
             for stream, round_index, step in itertools.product(Stream, range(60), range(40))]
    assert len(set(seeds)) == len(seeds)
