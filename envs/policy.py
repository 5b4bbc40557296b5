"""``StudentPolicy``: an HF causal LM as a TorchRL policy over ``TopPTokenEnv`` observations.

The student keeps its own right-aligned KV cache (``envs.kv_cache.IncrementalLM``). Each call
compares the observed rows with what it has cached and, per row:

- advances by the one new token when the row grew by exactly one token (the normal step);
- reuses its logits when the row is unchanged (a repeated call on the same observation);
- rebuilds the row from its tokens otherwise (a reset row, or an unseen tensordict).

So it is always correct, and cheap on the path ``env.rollout`` and ``Collector`` take.
The logits are the Q-values of the paper (one network is policy and Q); the policy samples
from (or takes the argmax of) the logits restricted to the admissible set:

    pi(a|s) = proj_p softmax(Q(s, .) / temperature)(a),   a in A_p(s) (the env's mask)
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase

from envs.kv_cache import IncrementalLM, output_vocab_size

__all__ = ["StudentPolicy"]


class StudentPolicy(TensorDictModuleBase):
    """Masked next-token policy of a student LM, with a per-row KV cache.

    Reads ``tokens`` [B, L], ``length`` [B] and the admissible set (``action_mask`` [B, V] for
    ``action_space="token"``, or ``support_ids``/``support_mask`` [B, K] for ``"support"``).
    Writes ``action`` int64 [B] (a token id, or a support index) and ``action_log_prob``
    float32 [B] (log of the masked, temperature-scaled softmax at the action); with
    ``return_logits=True`` also ``logits`` float32 [B, V], the unmasked student logits.

    Args:
        student: HF causal LM sharing the teacher's vocabulary.
        action_space: "token" or "support", as the env's.
        greedy: argmax instead of sampling (also under TorchRL's DETERMINISTIC exploration).
        temperature: softmax temperature (> 0) for sampling.
        kv_cache: False re-runs every prefix each call (naive reference).
        pad_token_id: filler id for the cache's padding columns.
        seed: seed of the sampling generator (None: drawn from torch's global generator).
        return_logits: also write the [B, V] logits (memory: B * V floats per step).
    """

    def __init__(
        self,
        student,
        *,
        action_space: str = "token",
        greedy: bool = False,
        temperature: float = 1.0,
        kv_cache: bool = True,
        pad_token_id: int = 0,
        seed: int | None = None,
        return_logits: bool = False,
    ) -> None:
        super().__init__()
        if action_space not in ("token", "support"):
            raise ValueError(
                f"action_space must be 'token' or 'support', got action_space={action_space!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}")
        self.student = student
        self.action_space = action_space
        self.greedy = bool(greedy)
        self.temperature = float(temperature)
        self.return_logits = bool(return_logits)
        self.vocab_size = output_vocab_size(student)
        self.lm = IncrementalLM(student, use_cache=kv_cache, pad_token_id=pad_token_id)
        mask_keys = ["action_mask"] if action_space == "token" else ["support_ids", "support_mask"]
        self.in_keys = ["tokens", "length", *mask_keys]
        self.out_keys = ["action", "action_log_prob"] + (["logits"] if return_logits else [])
        self._generator = torch.Generator()
        self._generator.manual_seed(
            int(torch.empty((), dtype=torch.int64).random_()) if seed is None else int(seed)
        )
        self._tokens: torch.Tensor | None = None

    def reset_cache(self) -> None:
        """Forget the cached rows (the next call rebuilds every row)."""
        self._tokens = None
        self.lm.last_logits = None

    def set_seed(self, seed: int) -> None:
        self._generator.manual_seed(int(seed))

    def _sync(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Bring the cache up to the observed rows; return next-token logits [B, V]."""
        batch, width = tokens.shape
        device = tokens.device
        if self._tokens is None or self._tokens.shape != tokens.shape:
            rebuild = torch.ones(batch, dtype=torch.bool, device=device)
            advance = torch.zeros(batch, dtype=torch.bool, device=device)
        else:
            seen = self.lm.lengths.to(device)
            columns = torch.arange(width, device=device)
            same_prefix = ((tokens == self._tokens) | (columns >= seen[:, None])).all(-1)
            advance = same_prefix & (length == seen + 1)
            rebuild = ~(advance | (same_prefix & (length == seen)))
        if bool(rebuild.any()):
            rows = rebuild.nonzero().squeeze(-1)
            sequences = [tokens[r, : int(length[r])] for r in rows.tolist()]
            if self._tokens is None or self._tokens.shape != tokens.shape:
                self.lm.last_logits = None
            self.lm.restart_rows(rows, sequences)
        if bool(advance.any()):
            last = tokens.gather(-1, (length - 1).clamp(min=0)[:, None]).squeeze(-1)
            self.lm.append(last, rows=None if bool(advance.all()) else advance)
        self._tokens = tokens.clone()
        return self.lm.last_logits

    def _sample(self, log_probs: torch.Tensor) -> torch.Tensor:
        """One draw per row by inverse CDF (much faster than multinomial at V ~ 50k).

        u ~ U[0, 1) * total; action = first index whose cumulative mass exceeds u, which is
        never a zero-probability (masked) index.
        """
        cdf = log_probs.exp().double().cumsum(-1)
        u = torch.rand((cdf.shape[0], 1), generator=self._generator, dtype=torch.float64)
        return torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).squeeze(-1)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        from torchrl.envs.utils import ExplorationType, exploration_type

        tokens = tensordict.get("tokens")
        length = tensordict.get("length")
        if tokens.dim() != 2:
            raise ValueError(
                f"StudentPolicy expects a [B, L] 'tokens' entry (one env step), got {tuple(tokens.shape)}"
            )
        if bool((length < 1).any()):
            raise ValueError(
                "every row needs at least one token; reset the env before calling the policy"
            )
        if self.action_space == "token":
            allowed = tensordict.get("action_mask")
            if allowed.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"teacher and student must share a tokenizer: the env's action space has "
                    f"{allowed.shape[-1]} tokens, the student's vocabulary {self.vocab_size}"
                )
        else:
            allowed = tensordict.get("support_mask")
        logits = self._sync(tokens, length).float()
        q = (
            logits
            if self.action_space == "token"
            else logits.gather(-1, tensordict.get("support_ids"))
        )
        log_probs = torch.log_softmax(q.masked_fill(~allowed, float("-inf")) / self.temperature, -1)
        if self.greedy or exploration_type() in (
            ExplorationType.DETERMINISTIC,
            ExplorationType.MODE,
        ):
            action = log_probs.argmax(-1)
        else:
            action = self._sample(log_probs)
        tensordict.set("action", action)
        tensordict.set("action_log_prob", log_probs.gather(-1, action[:, None]).squeeze(-1))
        if self.return_logits:
            tensordict.set("logits", logits)
        return tensordict
