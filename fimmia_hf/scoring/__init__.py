"""TargetScorer: the target model's loss on each sample and its neighbours, fast and model-agnostic.

Membership signals are differences between a sample's loss and its neighbours' losses, so the
scorer must be exact (scores may not depend on batch size, padding or caching) and it is where the
cost is (K + 1 forwards per sample and target). One engine serves every model family:

* each sample's variants (original + K neighbours) share their media, which is processed and
  encoded once;
* the original runs first with `use_cache=True`; every neighbour reuses its KV cache up to the
  neighbour's own first differing token (the system prompt, the media when it comes before the
  change, the unchanged words), so only the changed tails run, right-padded, in batches of similar
  tail length; identical variants run once and no token after the last scored one runs;
* a tail that contains the media gets the encoded media features, not the pixels again;
* logits are computed only where a scored token is predicted (`logits_to_keep` as a boolean mask);
* the only family-specific piece is position ids: models with `get_rope_index` (Qwen2/2.5-VL
  M-RoPE) get theirs from it, all others count tokens.

Output columns (plain names; `name` adds a `model_name` column so the base and fine-tuned runs of the
paired protocol concatenate without renaming): `loss`, `neighbor_losses`, and with `token_stats` the
per-token `token_logprobs`, `token_mean_logprob` (μ = Σ_z p(z) log p(z)), `token_std_logprob`
(σ of log p(z) under p), `token_entropy` (= −μ) and `token_max_logprob` (log max_z p(z)); with
`token_stats="all"` the same for every neighbour (`neighbor_token_logprobs`, ...).

Modules: `loading` (the target and its processor), `engine` (the exact, prefix-sharing scorer),
`scorer` (`TargetScorer`, the stage, and `score_distributed` under `accelerate launch`), `cli`
(`fimmia-hf score`).
"""

from .engine import ScoringEngine, loss_of, score_plain, token_statistics
from .loading import load_target
from .scorer import TargetScorer, score_distributed

__all__ = ["ScoringEngine", "TargetScorer", "load_target", "loss_of", "score_distributed", "score_plain",
           "token_statistics"]
