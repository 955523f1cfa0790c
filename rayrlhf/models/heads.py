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


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) for each row: the head applied at the last real token. input_ids, attention_mask: (B, T) -> (B,)."""
    hidden = _hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return _score_head(model)(last).squeeze(-1).float()


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s_t) at every position, for a critic (e.g. initialised from the RM). (B, T) -> (B, T)."""
    return _score_head(model)(_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()
