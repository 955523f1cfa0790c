"""Data sources, the prompt-id split, tokenisation and collation, checked against the raw files and by hand."""
import gzip
import hashlib
import json
import re

import pytest

from rayrlhf.config import DataSource, SyntheticTask, load_config
from rayrlhf.data.batches import (collate_groups, collate_pair_list, collate_pairs, encode_prompt_response,
                                  group_micro_batches, micro_batch_slices, pair_micro_batches, rank_shard)
from rayrlhf.data.rollouts import collate_sequences
from rayrlhf.data.sources import (is_eval_prompt, load_preference_pairs, load_saved_rollouts, response_groups, split_by_prompt,
                                   split_hh_transcript)
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.errors import DataError
from rayrlhf.pipeline import load_prompt_sets

from conftest import DATA, data_file

SYNTHETIC = SyntheticTask()


def tldr_record(choice=0, texts=(" first", " second"), post_id="p1"):
    return {"info": {"id": post_id, "post": "body", "title": "T", "subreddit": "sub"},
            "summaries": [{"text": t} for t in texts], "choice": choice}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def load(fmt, path, **keys):
    return load_preference_pairs(DataSource(format=fmt, path=path, **keys), SYNTHETIC, seed=0)


def test_shipped_data_matches_the_checksums_its_readme_gives():
    listed = dict(re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", (DATA / "README.md").read_text(), re.M))
    shipped = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(listed) == shipped and len(shipped) == 4
    for name, digest in listed.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name


def test_tldr_real_file_preferred_is_summaries_choice():
    path = data_file("tldr", "comparisons_batch13.jsonl")
    loaded = load("tldr", str(path))
    raw = [json.loads(line) for line in open(path)]
    assert len(loaded.pairs) == len(raw) == 1097
    first = raw[0]
    assert loaded.pairs[0]["chosen"] == first["summaries"][first["choice"]]["text"]
    assert loaded.pairs[0]["rejected"] == first["summaries"][1 - first["choice"]]["text"]
    assert loaded.pairs[0]["prompt"].endswith("TL;DR:") and f"r/{first['info']['subreddit']}" in loaded.pairs[0]["prompt"]
    assert loaded.pairs[0]["prompt_id"] == first["info"]["id"]


def test_tldr_subreddit_selection_keeps_and_leaves_out_the_posts_their_info_names():
    path = data_file("tldr", "comparisons_batch13.jsonl")
    by_subreddit = {}
    for line in open(path):
        record = json.loads(line)
        by_subreddit.setdefault(record["info"]["subreddit"], []).append(record["info"]["id"])
    held_out = ["tifu", "personalfinance", "legaladvice"]
    kept, rest = load("tldr", str(path), subreddits=held_out).pairs, load("tldr", str(path), exclude_subreddits=held_out).pairs
    assert sorted(kept["prompt_id"]) == sorted(i for name in held_out for i in by_subreddit[name])
    assert len(kept) + len(rest) == 1097 and not set(kept["prompt_id"]) & set(rest["prompt_id"])
    capped = load("tldr", str(path), subreddits=["tifu"], max_records=5)
    assert len(capped.pairs) == 5 and all("SUBREDDIT: r/tifu\n" in prompt for prompt in capped.pairs["prompt"])
    with pytest.raises(ValueError, match="subreddits and exclude_subreddits select TL;DR posts; format 'synthetic' has none"):
        DataSource(subreddits=["tifu"])


def test_tldr_split_by_post_id_never_shares_a_post():
    loaded = load("tldr", str(data_file("tldr", "comparisons_batch13.jsonl")))
    train, held_out = split_by_prompt(loaded.pairs, 0.15, seed=0)
    assert not set(train["prompt_id"]) & set(held_out["prompt_id"])
    assert len(train) + len(held_out) == 1097 and 0.08 < len(held_out) / 1097 < 0.25
    again_train, _ = split_by_prompt(loaded.pairs.shuffle(seed=3), 0.15, seed=0)
    assert set(again_train["prompt_id"]) == set(train["prompt_id"])  # independent of row order


def test_hh_real_file_prompt_ends_with_assistant_turn():
    path = data_file("hh", "helpful-base-test.jsonl.gz")
    loaded = load("hh", str(path))
    first = json.loads(gzip.open(path, "rt").readline())
    cut = first["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    assert loaded.pairs[0]["prompt"] == first["chosen"][:cut]
    assert loaded.pairs[0]["chosen"] == first["chosen"][cut:]
    assert len(loaded.pairs) + sum(loaded.dropped.values()) == 2354


def test_split_hh_transcript_by_hand():
    assert split_hh_transcript("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: sure") == (
        "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant:", " sure")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [tldr_record(), '{"info": oops}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load("tldr", path)


def test_a_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(tldr_record()).encode() + b'\n{"info": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: byte 0xe9 at column 14 is not UTF-8 text"):
        load("tldr", str(path))


def test_a_truncated_gzip_file_is_named(tmp_path):
    whole = gzip.compress("".join(json.dumps(tldr_record()) + "\n" for _ in range(50)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot be read( past line \d+)? \(a truncated or damaged file\?\)"):
        load("tldr", str(path))


def test_record_missing_a_field(tmp_path):
    record = tldr_record()
    del record["summaries"]
    path = write_jsonl(tmp_path / "missing.jsonl", [record])
    with pytest.raises(DataError, match=r"missing\.jsonl:1: record has no field 'summaries'"):
        load("tldr", path)


def test_choice_outside_zero_one(tmp_path):
    path = write_jsonl(tmp_path / "choice.jsonl", [tldr_record(), tldr_record(choice=2)])
    with pytest.raises(DataError, match=r"choice\.jsonl:2: choice must be 0 or 1, got 2"):
        load("tldr", path)


def test_identical_pairs_dropped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [tldr_record(), tldr_record(texts=(" same", " same"), post_id="p2")])
    loaded = load("tldr", path)
    assert len(loaded.pairs) == 1 and loaded.dropped == {"chosen equals rejected": 1}


def test_generic_jsonl_with_configured_keys(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"q": "Why?", "good": "Because.", "bad": "No."}])
    pairs = load("jsonl", path, prompt_key="q", chosen_key="good", rejected_key="bad").pairs
    assert (pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("Why?", "Because.", "No.")
    with pytest.raises(DataError, match=r"g\.jsonl:1: record has no field 'prompt'"):
        load("jsonl", path)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]}), tmp_path / "p.parquet")
    pairs = load("parquet", str(tmp_path / "p.parquet")).pairs
    assert pairs["chosen"] == ["x", "y"] and pairs["rejected"] == ["z", "w"]


def test_response_groups_from_cnndm_have_k_distinct_responses():
    pairs = load("tldr", str(data_file("tldr", "comparisons_cnndm0.jsonl"))).pairs
    groups = response_groups(pairs, samples_per_prompt=4)
    assert len(groups) == 45 and all(len(set(g)) == 4 for g in groups["responses"])
    with pytest.raises(DataError, match="no prompt has 5 distinct responses"):
        response_groups(pairs, samples_per_prompt=5)


def test_eval_side_is_a_stable_function_of_the_id():
    flags = [is_eval_prompt(f"id{i}", 0.25, seed=1) for i in range(2000)]
    assert flags == [is_eval_prompt(f"id{i}", 0.25, seed=1) for i in range(2000)]
    assert 0.2 < sum(flags) / 2000 < 0.3


def test_truncation_keeps_prompt_end_and_response():
    tokenizer = SyntheticPreferenceTask(SYNTHETIC, 0).tokenizer()
    ids = encode_prompt_response(tokenizer, "Q: t1 t2 t3 A:", "w1 w2 w3 w4", max_prompt_tokens=2, max_response_tokens=3)
    assert tokenizer.convert_ids_to_tokens(ids) == ["t3", "A:", "w1", "w2", "[EOS]"]


def test_collation_pads_right_with_masks():
    batch = collate_pairs([[5, 6, 7]], [[8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    groups = collate_groups([[[1], [2, 3]], [[4], [5]]], pad_id=0)
    assert groups.group_size == 2 and groups.input_ids.tolist() == [[1, 0], [2, 3], [4, 0], [5, 0]]
    assert rank_shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_synthetic_gold_reward_by_hand():
    task = SyntheticPreferenceTask(SyntheticTask(max_response_words=3), 0)
    # relevance 2 (t1, t2), repeats 1 (t1 twice), overlong 4 - 3 = 1  ->  2 - 0.5 - 1 = 0.5
    assert task.gold_reward("Q: t1 t2 t3 A:", "t1 t2 t1 w5") == 0.5
    anywhere = SyntheticPreferenceTask(SyntheticTask(max_response_words=3, topics_per_prompt=2, relevance="any"), 0)
    # relevance min(3 distinct topics t1 t7 t9, cap 2) = 2, repeats 1, overlong 1  ->  0.5; off-prompt topics count
    assert anywhere.gold_reward("Q: t1 t2 A:", "t7 t9 t1 t7") == 0.5
    assert anywhere.gold_reward("Q: t1 t2 A:", "t7 w1") == 1.0
    penalised = SyntheticPreferenceTask(
        SyntheticTask(topics_per_prompt=2, relevance="any", excess_topic_penalty=0.75), 0)
    # 4 distinct topics, limit 2: relevance 2 - 0.75 * 2 = 0.5; no repeats, 4 words <= L = 6
    assert penalised.gold_reward("Q: t1 t2 A:", "t7 t9 t1 t3") == 0.5
    assert penalised.gold_reward("Q: t1 t2 A:", "t7 t9 w1 w2") == 2.0


def test_synthetic_labelled_data_never_pass_the_topic_limit():
    """The labelled data name at most topics_per_prompt distinct topics, so an RM trained on them cannot see the
    excess-topic penalty (the gold reward and the proxy part only where the policy goes beyond them)."""
    task = SyntheticPreferenceTask(SyntheticTask(
        relevance="any", topics_per_prompt=2, reference_topic_rate=0.6, excess_topic_penalty=1.0), 0)
    responses = [r[side] for r in task.preference_pairs() for side in ("chosen", "rejected")]
    distinct_topics = [len({w for w in response.split() if w.startswith("t")}) for response in responses]
    assert max(distinct_topics) == 2 and distinct_topics.count(2) > 100


def test_biased_labellers_count_topics_past_the_gold_limit():
    """With labeller_topic_limit 4 over a gold limit of 2, the labelled data name up to 4 topics and are ordered by
    the labellers' reward (more topics better), while the gold reward, and the drifted pairs, charge the excess."""
    task = SyntheticPreferenceTask(SyntheticTask(relevance="any", topics_per_prompt=2, labeller_topic_limit=4,
                                                 reference_topic_rate=0.6, excess_topic_penalty=1.0), 0)
    # 3 distinct topics, no repeats, 4 words <= L: labellers 3; gold min(3, 2) - 1.0 * (3 - 2) = 1
    assert task.labeller_reward("Q: t1 t2 A:", "t7 t9 t1 w1") == 3.0
    assert task.gold_reward("Q: t1 t2 A:", "t7 t9 t1 w1") == 1.0
    pairs = task.preference_pairs()
    distinct_topics = [len({w for w in r[side].split() if w.startswith("t")}) for r in pairs for side in ("chosen", "rejected")]
    assert max(distinct_topics) == 4 and distinct_topics.count(4) > 50
    assert all(task.labeller_reward(r["prompt"], r["chosen"]) > task.labeller_reward(r["prompt"], r["rejected"])
               for r in pairs)
    assert any(task.gold_reward(r["prompt"], r["chosen"]) < task.gold_reward(r["prompt"], r["rejected"]) for r in pairs)
    assert all(task.gold_reward(r["prompt"], r["chosen"]) > task.gold_reward(r["prompt"], r["rejected"])
               for r in task.drifted_pairs())
    unbiased = SyntheticPreferenceTask(SyntheticTask(relevance="any", topics_per_prompt=2, excess_topic_penalty=1.0), 0)
    assert unbiased.labeller_reward("Q: t1 t2 A:", "t7 t9 t1 w1") == unbiased.gold_reward("Q: t1 t2 A:", "t7 t9 t1 w1")


def test_length_biased_labellers_add_a_bonus_per_word_and_charge_no_overlong_penalty():
    """With labeller_length_bonus 0.25 and L = 3, the labellers score relevance - 0.5 repeats + 0.25 words, with no
    overlong penalty, while the gold reward still charges the words past L; the topic limits combine."""
    task = SyntheticPreferenceTask(SyntheticTask(relevance="any", topics_per_prompt=2, max_response_words=3,
                                                 labeller_length_bonus=0.25, labeller_topic_limit=3), 0)
    # 5 words, 3 distinct topics (t7 t9 t1), 1 repeat (t7): labellers min(3, 3) - 0.5 + 0.25 * 5 = 3.75;
    # gold min(3, 2) - 0.5 - 1.0 * (5 - 3) = -0.5
    assert task.labeller_reward("Q: t1 t2 A:", "t7 t9 t1 t7 w1") == 3.75
    assert task.gold_reward("Q: t1 t2 A:", "t7 t9 t1 t7 w1") == -0.5


def test_synthetic_any_relevance_labelled_data_mention_topics_of_every_kind():
    task = SyntheticPreferenceTask(SyntheticTask(relevance="any", reference_topic_rate=0.25), 0)
    pairs = task.preference_pairs()
    words = [w for r in pairs for w in (r["chosen"] + " " + r["rejected"]).split()]
    off_prompt = [w for r in pairs for w in r["chosen"].split() if w.startswith("t") and w not in r["prompt"].split()]
    assert 0.15 < sum(w.startswith("t") for w in words) / len(words) < 0.35 and len(off_prompt) > 100
    assert all(row["chosen_gold"] > row["rejected_gold"] for row in pairs)


def test_synthetic_pairs_are_gold_ordered_and_drift_reverses_length_preference():
    task = SyntheticPreferenceTask(SYNTHETIC, 0)
    pairs, drifted = task.preference_pairs(), task.drifted_pairs()
    assert all(row["chosen_gold"] > row["rejected_gold"] for row in pairs)
    assert all(task.gold_reward(r["prompt"], r["chosen"]) == r["chosen_gold"] for r in pairs.select(range(50)))

    def longer_chosen(table):
        return sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in table) / len(table)

    assert longer_chosen(pairs) > 0.5 > 0.2 > longer_chosen(drifted)


def test_synthetic_reference_options_shape_the_labelled_responses():
    task = SyntheticPreferenceTask(SyntheticTask(topics_per_prompt=6, max_response_words=8, reference_max_words=4,
                                                 reference_distractor_rate=0.5, reference_repeats=False), 0)
    pairs = task.preference_pairs()
    responses = [(r["prompt"].split()[1:-1], response.split()) for r in pairs for response in (r["chosen"], r["rejected"])]
    assert max(len(words) for _, words in responses) == 4
    assert all(len(set(words)) == len(words) for _, words in responses)
    distractors = [w for topics, words in responses for w in words if w.startswith("t") and w not in topics]
    assert len(distractors) > 0.1 * sum(len(words) for _, words in responses)
    # the defaults draw nothing extra: the labelled data are those the task made before these options existed
    assert SyntheticPreferenceTask(SYNTHETIC, 0).preference_pairs()["chosen"][:3] == \
        ["w2 t13", "t13 w16 t13 w17 t12 w14", "t15 w16 w13 w21 t16 w15"]


def write_saved_rollouts(path, groups):
    """As the Ray loop writes samples/round_NNNN_meta.jsonl (Pipeline.save_samples)."""
    path.write_text("".join(json.dumps({"prompt": p, "responses": r}) + "\n" for p, r in groups))
    return path


def test_saved_rollouts_are_meta_groups_of_their_first_k_responses(tmp_path):
    path = write_saved_rollouts(tmp_path / "round_0003_meta.jsonl",
                                [("a b", ["x", "y", "z"]), ("c", ["u", "u", "v"])])
    groups = load_saved_rollouts(DataSource(format="rollouts", path=str(path)), samples_per_prompt=2)
    # The policy's samples stay as sampled (repeats included: they are what the policy says).
    assert groups["prompt"] == ["a b", "c"] and groups["responses"] == [["x", "y"], ["u", "u"]]
    with pytest.raises(DataError, match=r"round_0003_meta.jsonl:1: 3 responses, fewer than reward.samples_per_prompt=4"):
        load_saved_rollouts(DataSource(format="rollouts", path=str(path)), samples_per_prompt=4)


def test_saved_rollouts_feed_the_reward_model_meta_data_only(tmp_path):
    from rayrlhf.config import DataConfig
    from rayrlhf.data.reward_data import prepare_reward_data, task_tokenizer

    path = write_saved_rollouts(tmp_path / "meta.jsonl", [(f"prompt {i}", [f"r{i}{j}" for j in range(5)]) for i in range(6)])
    data = DataConfig(meta=DataSource(format="rollouts", path=str(path)))
    tokenizer = task_tokenizer(data, seed=0)
    prepared = prepare_reward_data(data, tokenizer, samples_per_prompt=4, need_meta=True, seed=0)
    assert len(prepared.meta) == 6 and all(len(group) == 4 for group in prepared.meta)
    with pytest.raises(ValueError, match="data.preference cannot have format 'rollouts'"):
        DataConfig(preference=DataSource(format="rollouts", path=str(path)))


def test_micro_batches_keep_pairs_and_groups_whole_and_drop_only_padding():
    # pairs: chosen rows first; 3 pairs in micro-batches of 2 -> pairs (0, 1) and (2,)
    batch = collate_pair_list([([1, 2, 3], [4]), ([5], [6, 7]), ([8], [9])], pad_id=0)
    first, second = pair_micro_batches(batch, 2)
    assert first.input_ids.tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert second.input_ids.tolist() == [[8], [9]] and second.attention_mask.tolist() == [[1], [1]]
    assert [part.num_pairs for part in pair_micro_batches(batch, None)] == [3]
    # groups of k = 2, one prompt per micro-batch
    groups = collate_groups([[[1], [2, 3]], [[4], [5]]], pad_id=0)
    parts = group_micro_batches(groups, 1)
    assert [part.input_ids.tolist() for part in parts] == [[[1, 0], [2, 3]], [[4], [5]]]
    assert all(part.group_size == 2 and part.num_prompts == 1 for part in parts)
    assert micro_batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_a_sequence_micro_batch_keeps_every_response_position():
    batch = collate_sequences([[5, 6], [5]], [[7, 8, 9], [7]], pad_id=0)
    short = batch.part(slice(1, 2))
    assert short.input_ids.tolist() == [[5, 7]] and short.response_positions.max() < short.input_ids.shape[1]
    assert short.response_tokens.shape == batch.response_tokens[1:].shape


def test_synthetic_distractors_need_topics_outside_the_wanted_ones():
    """With relevance any every topic is wanted, so there are no distractors: fillers take their place."""
    task = SyntheticPreferenceTask(SyntheticTask(relevance="any", reference_distractor_rate=0.5), 0)
    words = [w for r in task.preference_pairs() for w in (r["chosen"] + " " + r["rejected"]).split()]
    assert any(w.startswith("w") for w in words) and all(w.startswith(("t", "w")) for w in words)


def test_unbiased_demonstrations_stay_within_the_gold_limits_while_biased_chosen_responses_do_not():
    """SFT's data with data.synthetic.demonstrations=unbiased: one per prompt, never past L words or the gold's topic
    limit, whatever the labellers' biases; the length-biased labellers' chosen responses run past L."""
    task = SyntheticPreferenceTask(SyntheticTask(relevance="any", topics_per_prompt=3, reference_topic_rate=0.25,
                                                 labeller_length_bonus=0.2, reference_max_words=8, num_prompts=200), 0)
    demonstrations = task.demonstrations()
    assert [prompt for prompt, _ in demonstrations] == [prompt for _, prompt in task.prompts()]
    words = [response.split() for _, response in demonstrations]
    assert max(map(len, words)) <= 6 and max(len({w for w in r if w.startswith("t")}) for r in words) <= 3
    chosen = [c.split() for c in task.preference_pairs()["chosen"]]
    assert sum(len(c) > 6 for c in chosen) > 0.2 * len(chosen)
    assert task.demonstrations() == demonstrations  # the same for the same seed


def test_sft_trains_on_unbiased_demonstrations_of_the_training_prompts_when_asked():
    config = load_config("conf/tiny.yaml", ["data.synthetic.demonstrations=unbiased"])
    sets = load_prompt_sets(config)
    demonstrations = dict(SyntheticPreferenceTask(config.data.synthetic, config.seed).demonstrations())
    assert {prompt for prompt, _ in sets.sft} == set(sets.train)
    assert all(demonstrations[prompt] == response for prompt, response in sets.sft)
