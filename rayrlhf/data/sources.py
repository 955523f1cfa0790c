"""Load preference pairs from any configured source into one shape.

Every loader returns a `datasets.Dataset` with string columns prompt_id, prompt, chosen, rejected
(the synthetic task adds chosen_gold / rejected_gold). A malformed record is a DataError naming file:line;
pairs whose chosen equals rejected are dropped and counted.
"""
import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import datasets

from rayrlhf.config import DataSource, SyntheticTask
from rayrlhf.errors import DataError

HH_ASSISTANT_TURN = "\n\nAssistant:"
SUBREDDIT = re.compile(r"^SUBREDDIT: r/(\S+)", re.MULTILINE)


@dataclass
class LoadedPairs:
    """Pairs plus what was dropped on the way (reported, never silent)."""

    pairs: datasets.Dataset
    dropped: Dict[str, int] = field(default_factory=dict)


def _json_lines(path: str) -> Iterator[Tuple[str, dict]]:
    """("file:line", record) for each non-empty line of a .jsonl or .jsonl.gz file; a bad byte, a bad line or a
    damaged gzip stream is a DataError naming the file (and the line)."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, raw_line in enumerate(handle, start=1):
                record = _json_record(raw_line, f"{path}:{number}")
                if record is not None:
                    yield f"{path}:{number}", record
    except (EOFError, OSError, zlib.error) as error:
        past = f" past line {number}" if number else ""
        raise DataError(f"{path}: cannot be read{past} (a truncated or damaged file?): {error}") from None


def _json_record(raw_line: bytes, where: str) -> Optional[dict]:
    """The JSON object on one line (None for a blank line), or a DataError naming `where`."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: byte 0x{raw_line[error.start]:02x} at column {error.start + 1} is not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _field(record: dict, key: str, where: str, kind: type = str):
    """record[key], which must exist and be of `kind` (a DataError naming where and what otherwise)."""
    if key not in record:
        raise DataError(f"{where}: record has no field {key!r} (fields: {', '.join(sorted(record))})")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def render_tldr_prompt(info: dict, where: str) -> str:
    """The summarisation prompt of Stiennon et al.: Reddit posts, or CNN/DM articles (the OOD domain)."""
    if "post" in info:
        subreddit, title = _field(info, "subreddit", where), _field(info, "title", where)
        return f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {_field(info, 'post', where)}\nTL;DR:"
    if "article" in info:
        title = info.get("title") or ""
        return f"TITLE: {title}\nARTICLE: {_field(info, 'article', where)}\nTL;DR:"
    raise DataError(f"{where}: info has neither 'post' nor 'article'")


def _tldr_rows(path: str) -> Iterator[Tuple[str, dict]]:
    for where, record in _json_lines(path):
        info = _field(record, "info", where, dict)
        summaries = _field(record, "summaries", where, list)
        choice = _field(record, "choice", where, int)
        if choice not in (0, 1):
            raise DataError(f"{where}: choice must be 0 or 1, got {choice}")
        if len(summaries) != 2:
            raise DataError(f"{where}: expected 2 summaries, got {len(summaries)}")
        texts = [_field(summary, "text", f"{where} summaries[{i}]") for i, summary in enumerate(summaries)]
        yield where, {
            "prompt_id": str(_field(info, "id", where)),
            "prompt": render_tldr_prompt(info, where),
            "chosen": texts[choice],
            "rejected": texts[1 - choice],
        }


def split_hh_transcript(transcript: str) -> Tuple[str, str]:
    """(prompt up to and including the last '\\n\\nAssistant:', the response after it)."""
    cut = transcript.rfind(HH_ASSISTANT_TURN)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT_TURN)
    return transcript[:cut], transcript[cut:]


def _hh_rows(path: str) -> Iterator[Tuple[str, dict]]:
    for where, record in _json_lines(path):
        try:
            prompt, chosen = split_hh_transcript(_field(record, "chosen", where))
            rejected_prompt, rejected = split_hh_transcript(_field(record, "rejected", where))
        except ValueError as error:
            raise DataError(f"{where}: transcript has {error}") from None
        row = {"prompt_id": _stable_id(prompt), "prompt": prompt, "chosen": chosen, "rejected": rejected}
        yield where, (row if prompt == rejected_prompt else {**row, "prompt": None})


def _keyed_rows(records: Iterator[Tuple[str, dict]], source: DataSource) -> Iterator[Tuple[str, dict]]:
    for where, record in records:
        prompt = _field(record, source.prompt_key, where)
        prompt_id = str(_field(record, source.prompt_id_key, where, object)) if source.prompt_id_key else _stable_id(prompt)
        yield where, {
            "prompt_id": prompt_id,
            "prompt": prompt,
            "chosen": _field(record, source.chosen_key, where),
            "rejected": _field(record, source.rejected_key, where),
        }


def _table_records(source: DataSource) -> Iterator[Tuple[str, dict]]:
    """Rows of a parquet file or a hub dataset, each named `source row N` in errors."""
    if source.format == "parquet":
        table = datasets.load_dataset("parquet", data_files=source.path, split="train")
    else:
        try:
            table = datasets.load_dataset(source.path, split=source.split)
        except Exception as error:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot load it"
            raise DataError(f"cannot load dataset {source.path!r} split {source.split!r}: {error}") from None
    for index, record in enumerate(table):
        yield f"{source.path} row {index}", record


def _stable_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def load_preference_pairs(source: DataSource, synthetic: SyntheticTask, seed: int) -> LoadedPairs:
    """All pairs of a source; drops (and counts) identical pairs and HH pairs whose prompts differ."""
    if source.format == "synthetic":
        from rayrlhf.data.synthetic import SyntheticPreferenceTask

        return LoadedPairs(SyntheticPreferenceTask(synthetic, seed).preference_pairs())
    if source.format == "tldr":
        rows = _tldr_rows(source.path)
    elif source.format == "hh":
        rows = _hh_rows(source.path)
    elif source.format == "jsonl":
        rows = _keyed_rows(_json_lines(source.path), source)
    else:
        rows = _keyed_rows(_table_records(source), source)
    kept: List[dict] = []
    dropped: Counter = Counter()
    for _, row in rows:
        if not _selected(row, source):
            continue
        if row["prompt"] is None:
            dropped["prompts differ between chosen and rejected"] += 1
        elif row["chosen"] == row["rejected"]:
            dropped["chosen equals rejected"] += 1
        else:
            kept.append(row)
        if source.max_records and len(kept) >= source.max_records:
            break
    if not kept:
        raise DataError(f"{source.path}: no usable preference pairs (dropped: {dict(dropped)})")
    return LoadedPairs(datasets.Dataset.from_list(kept), dict(dropped))


def subreddit_of(prompt: str) -> str:
    """The subreddit of a TL;DR post (`cnndm` for a CNN/DM article, which names none)."""
    found = SUBREDDIT.search(prompt)
    return found.group(1) if found else "cnndm"


def _selected(row: dict, source: DataSource) -> bool:
    """Whether a row passes the source's subreddit selection (every row without one)."""
    if not (source.subreddits or source.exclude_subreddits) or row["prompt"] is None:
        return True
    subreddit = subreddit_of(row["prompt"])
    return (not source.subreddits or subreddit in source.subreddits) and subreddit not in source.exclude_subreddits


def load_saved_rollouts(source: DataSource, samples_per_prompt: int) -> datasets.Dataset:
    """Meta data from a run's saved samples (samples/round_NNNN_meta.jsonl: {"prompt", "responses"} per line):
    the first k responses of each prompt, as response_groups gives them."""
    groups = []
    for where, record in _json_lines(source.path):
        prompt, responses = _field(record, "prompt", where), _field(record, "responses", where, list)
        if len(responses) < samples_per_prompt:
            raise DataError(f"{where}: {len(responses)} responses, fewer than reward.samples_per_prompt="
                            f"{samples_per_prompt}; lower it to at most the samples the run saved per prompt")
        groups.append({"prompt_id": _stable_id(prompt), "prompt": prompt, "responses": responses[:samples_per_prompt]})
        if source.max_records and len(groups) >= source.max_records:
            break
    if not groups:
        raise DataError(f"{source.path}: no saved rollouts")
    return datasets.Dataset.from_list(groups)


def is_eval_prompt(prompt_id: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic split by prompt id: the same prompt always lands on the same side, whatever the row order."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_by_prompt(pairs: datasets.Dataset, eval_fraction: float, seed: int) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) with no prompt id on both sides (several rows share a post in TL;DR)."""
    held_out = [is_eval_prompt(prompt_id, eval_fraction, seed) for prompt_id in pairs["prompt_id"]]
    train = pairs.select([i for i, flag in enumerate(held_out) if not flag])
    evaluation = pairs.select([i for i, flag in enumerate(held_out) if flag])
    if len(train) == 0 or len(evaluation) == 0:
        raise DataError(
            f"splitting {len(pairs)} pairs by prompt with eval_fraction={eval_fraction} left an empty side; "
            "use more data or another eval_fraction"
        )
    return train, evaluation


def response_groups(pairs: datasets.Dataset, samples_per_prompt: int) -> datasets.Dataset:
    """Unlabelled meta data from pairs: the distinct responses of each prompt, groups of exactly k.

    Prompts with fewer than k distinct responses are left out; labels are ignored (MetaRM needs none).
    """
    responses: Dict[str, List[str]] = {}
    prompts: Dict[str, str] = {}
    for row in pairs:
        group = responses.setdefault(row["prompt_id"], [])
        prompts[row["prompt_id"]] = row["prompt"]
        for text in (row["chosen"], row["rejected"]):
            if text not in group:
                group.append(text)
    groups = [
        {"prompt_id": prompt_id, "prompt": prompts[prompt_id], "responses": texts[:samples_per_prompt]}
        for prompt_id, texts in responses.items()
        if len(texts) >= samples_per_prompt
    ]
    if not groups:
        most = max(len(texts) for texts in responses.values())
        raise DataError(
            f"no prompt has {samples_per_prompt} distinct responses for the meta data (the most any prompt has is "
            f"{most}); lower reward.samples_per_prompt or use another meta source"
        )
    return datasets.Dataset.from_list(groups)
