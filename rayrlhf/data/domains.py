"""The domains of bilevel reward learning: preference pairs grouped by where they come from, each domain's
prompts split into a support half (its responses, labels unused: the inner problem's data) and a query half
(its labelled pairs: the outer problem's)."""
import logging
import random
from dataclasses import dataclass
from typing import Dict, List

import datasets

from rayrlhf.config import BilevelConfig, DataConfig
from rayrlhf.data.sources import load_preference_pairs, response_groups, split_by_prompt, subreddit_of
from rayrlhf.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Domain:
    name: str
    support: List[dict]
    """Response groups: {"prompt", "responses"} with reward.samples_per_prompt responses each."""
    query: List[dict]
    """Labelled pairs: {"prompt", "chosen", "rejected"}."""


def pair_domain(prompt: str, domain_by: str, topic_groups: int) -> str:
    """The domain of a pair from its prompt: a TL;DR post's subreddit (`cnndm` for articles, which name none), the
    synthetic task's topic group (the first topic word's number modulo topic_groups), or `all` (domain_by none)."""
    if domain_by == "subreddit":
        return subreddit_of(prompt)
    if domain_by == "none":
        return "all"
    first_topic = prompt.split()[1]  # "Q: t3 t7 t12 A:"
    return f"topics{int(first_topic[1:]) % topic_groups}"


def split_domains(pairs: datasets.Dataset, bilevel: BilevelConfig, samples_per_prompt: int, seed: int) -> List[Domain]:
    """The pairs grouped by pair_domain, each domain's prompts halved into support and query at random (seeded)."""
    by_domain: Dict[str, List[dict]] = {}
    for row in pairs:
        by_domain.setdefault(pair_domain(row["prompt"], bilevel.domain_by, bilevel.topic_groups), []).append(row)
    return [domain for name, rows in sorted(by_domain.items())
            if (domain := halve(name, rows, bilevel.min_prompts, samples_per_prompt, seed)) is not None]


def named_domains(data: DataConfig, bilevel: BilevelConfig, samples_per_prompt: int, seed: int) -> List[Domain]:
    """One domain per source of bilevel.domains; a source that is data.preference gives its training split only, so
    the RM's held-out prompts stay out of bilevel training as they do without named domains."""
    domains = []
    for name, source in bilevel.domains.items():
        pairs = load_preference_pairs(source, data.synthetic, seed).pairs
        if source == data.preference:
            pairs, _ = split_by_prompt(pairs, data.eval_fraction, seed)
        rows = list(pairs)
        if (domain := halve(name, rows, bilevel.min_prompts, samples_per_prompt, seed)) is not None:
            domains.append(domain)
    return domains


def halve(name: str, rows: List[dict], min_prompts: int, samples_per_prompt: int, seed: int):
    """A Domain from one domain's pairs, or None (with a warning) when it has fewer than min_prompts prompts."""
    prompts = sorted({row["prompt_id"] for row in rows})
    if len(prompts) < min_prompts:
        log.warning("bilevel: domain %r left out: %d prompt(s), fewer than reward.bilevel.min_prompts=%d",
                    name, len(prompts), min_prompts)
        return None
    random.Random(f"{seed}-{name}").shuffle(prompts)
    support_ids = set(prompts[: len(prompts) // 2])
    support_rows = datasets.Dataset.from_list([row for row in rows if row["prompt_id"] in support_ids])
    try:
        support = list(response_groups(support_rows, samples_per_prompt))
    except DataError as error:
        log.warning("bilevel: domain %r left out: %s", name, error)
        return None
    query = [row for row in rows if row["prompt_id"] not in support_ids]
    return Domain(name, support, query)


def bilevel_domains(data: DataConfig, bilevel: BilevelConfig, samples_per_prompt: int, seed: int, ranks: int = 1) -> List[Domain]:
    """The domains of a bilevel run: bilevel.domains, or the training split of data.preference (the held-out
    prompts stay out) divided by domain_by; a domain with fewer support prompts or labelled pairs than `ranks` (each
    rank takes a share of a step) is left out with a warning. No usable domain is a ConfigError naming the setting."""
    if bilevel.domains:
        domains = named_domains(data, bilevel, samples_per_prompt, seed)
    else:
        train_pairs, _ = split_by_prompt(load_preference_pairs(data.preference, data.synthetic, seed).pairs, data.eval_fraction, seed)
        domains = split_domains(train_pairs, bilevel, samples_per_prompt, seed)
    for domain in [d for d in domains if min(len(d.support), len(d.query)) < ranks]:
        log.warning("bilevel: domain %r left out: %d support prompt(s) and %d pair(s) cannot be shared by %d ranks",
                    domain.name, len(domain.support), len(domain.query), ranks)
        domains.remove(domain)
    if not domains:
        raise ConfigError(f"reward.method='bilevel' found no domain with at least reward.bilevel.min_prompts="
                          f"{bilevel.min_prompts} prompts; lower it or give more data")
    return domains


def describe_domains(domains: List[Domain]) -> str:
    return "bilevel domains: " + ", ".join(f"{d.name} ({len(d.support)} support prompts, {len(d.query)} pairs)" for d in domains)
