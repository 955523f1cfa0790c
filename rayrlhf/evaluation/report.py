"""evaluation.json (every number) and report.md (tables, the figures) in run_dir/evaluation/."""
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

POLICY_COLUMNS = ["win_rate", "tie_rate", "lose_rate", "judge_score", "kl_to_initial", "length_tokens", "length_words",
                  "self_bleu_2", "self_bleu_3", "self_bleu_4", "self_bleu_5", "embedding_similarity"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return "–" if value is None else str(value)


def markdown_table(rows: Dict[str, Dict[str, Any]], columns: Sequence[str], first: str) -> List[str]:
    """A markdown table: one row per key of `rows`, the given columns (missing ones as –)."""
    shown = [column for column in columns if any(column in row for row in rows.values())]
    lines = [f"| {first} | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(row.get(column)) for column in shown) + " |" for name, row in rows.items()]
    return lines


def write_report(folder: Path, results: Dict[str, Any]) -> None:
    """Write evaluation.json and report.md from the results evaluate_run returned."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
    settings = results["settings"]
    lines = [f"# Evaluation of {results['run_dir']}", "",
             f"{settings['prompts']} {settings['prompt_set'].replace('_', '-')} prompts × {settings['samples_per_prompt']} "
             "response(s) per policy, sampled at "
             f"temperature {settings['temperature']}, top-p {settings['top_p']}, seed {settings['seed']}. Judge: "
             f"{results['judge'] or 'none (set evaluation.judge_model)'}; tie within {settings['tie_margin']}.", "",
             "## Policies against the initial policy", ""]
    lines += markdown_table(results["policies"], POLICY_COLUMNS, "policy")
    lines += ["", "win/tie/lose: the judge's verdict on each held-out response against the initial policy's response "
              "to the same prompt; kl_to_initial: mean over samples of log π(y|x) - log π_initial(y|x) (per sequence); "
              "self_bleu_n: mean BLEU-n of each response against all the others (1: all identical); "
              "embedding_similarity: mean pairwise cosine of all-MiniLM-L6-v2 embeddings.", ""]
    if any("win_rate" in values for values in results["policies"].values()):
        lines += ["![win / tie / lose](win_rates.png)", ""]
    lines += ["## Reward models: accuracy on preference sets", ""]
    lines += markdown_table(results["reward_models"], list(results["preference_sets"]), "reward model")
    lines += ["", "Sets: " + "; ".join(f"`{name}` {size} pairs" for name, size in results["preference_sets"].items()), ""]
    if results["reward_differences"]:
        lines += ["## Reward differences between same-prompt policy samples, per round", ""]
        lines += markdown_table(results["reward_differences"], ["variance", "mean_abs", "pairs", "scored_by"], "round")
        lines += ["", "![reward-difference densities](reward_differences.png)", ""]
    (folder / "report.md").write_text("\n".join(lines), encoding="utf-8")


def write_responses(path: Path, responses: Dict[str, Iterable[Tuple[str, str]]]) -> None:
    """Every judged response, one JSON line each: policy, prompt, response (to read, or to judge again)."""
    with open(path, "w", encoding="utf-8") as handle:
        for policy, rows in responses.items():
            for prompt, response in rows:
                handle.write(json.dumps({"policy": policy, "prompt": prompt, "response": response}) + "\n")
