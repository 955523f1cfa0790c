"""Reading scalar heads: a reward per sequence (at its last real token) and a value per token (critic)."""
import torch
from transformers import PreTrainedModel


def _score_head(model: PreTrainedModel) -> torch.nn.Module:
    """The Linear(hidden, 1) of a *ForSequenceClassification model: `score` (decoders) or `classifier` (BERT)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `score` or `classifier` head")
    return head


def _hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last hidden states of the model's backbone."""
    # use_cache=False: a scoring or training pass has no later step to reuse keys and values for
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with mask 1; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


def _at_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token: (B, T, H) -> (B, H)."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) for each row: the head applied at the last real token. input_ids, attention_mask: (B, T) -> (B,)."""
    last = _at_last_token(_hidden_states(model, input_ids, attention_mask), attention_mask)  # (B, H)
    return _score_head(model)(last).squeeze(-1).float()


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) at every position, for a critic (e.g. initialised from the RM). (B, T) -> (B, T)."""
    return _score_head(model)(_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


def token_values_and_last_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """token_values and the backbone's hidden state at each row's last real token, from one pass: ((B, T), (B, H))."""
    hidden = _hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    return _score_head(model)(hidden).squeeze(-1).float(), _at_last_token(hidden, attention_mask)


def attach_group_head(model: PreTrainedModel, groups: int, seed: int) -> None:
    """A Linear(hidden, groups) `group_head` on a critic: group invariant learning's predictor p_φ(g | x, y), read at
    the last real token. A submodule, so the critic's engine trains, averages over ranks and checkpoints it."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(model.config.hidden_size, groups)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=generator)
        head.bias.zero_()
    model.group_head = head.to(next(model.parameters()).dtype)
