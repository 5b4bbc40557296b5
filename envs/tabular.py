"""A toy token env whose top-p soft optimum is known exactly: a Markov teacher over a few tokens.

The teacher's next-token distribution depends only on the last token, pi_T(a | last), so with
the number of generated tokens t the state (t, last) is Markov and the finite-horizon token MDP
is a small tabular MDP. ``TabularTokenEnv`` is a ``TopPTokenEnv`` driven by that teacher (same
observations, masks, rewards and resets as the LM env), and ``tabular_mdp`` writes the same MDP
in the tensors of ``tdkd.tabular``:

    states   s = t * V + last for t in [0, H), plus one absorbing terminal state S - 1
    actions  the V tokens; admissible set A_p(s) = the teacher's nucleus at ``last``
    P        (t, last) --a--> (t + 1, a), or the terminal state when a is EOS or t + 1 = H
    r        the env's reward for (s, a): log pi_T(a|last), its projected form, or 0
    terminal one admissible action (token 0), reward 0, self-loop: V(terminal) = 0

The horizon H (= ``max_new_tokens``) is part of the state, so truncation is a true end of the
MDP here. ``optimal_q`` solves it with ``tdkd.tabular.soft_value_iteration``; agents' oracle
tests compare what they learn on the env with that answer (``state_index`` maps observations
to s).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from envs.token_env import TopPTokenEnv
from tdkd.topp import top_p_mask

__all__ = ["MarkovTeacher", "TabularTokenEnv", "markov_teacher_logits"]


def markov_teacher_logits(
    vocab_size: int = 8, *, eos_token_id: int = 1, scale: float = 2.0, seed: int = 0
) -> torch.Tensor:
    """Random teacher logits [V, V] (row = last token): Gaussian * scale, pad token 0 impossible.

    Token 0 is the pad id and gets -inf; EOS gets an extra -1 so episodes are not all length 1.
    """
    if vocab_size < 3:
        raise ValueError(
            f"vocab_size must be >= 3 (pad, eos and one word), got vocab_size={vocab_size}"
        )
    generator = torch.Generator().manual_seed(int(seed))
    logits = scale * torch.randn(vocab_size, vocab_size, generator=generator)
    logits[:, eos_token_id] -= 1.0
    logits[:, 0] = float("-inf")
    return logits


class MarkovTeacher(torch.nn.Module):
    """A causal-LM look-alike whose logits at a position are ``table[token at that position]``.

    Accepts the keyword arguments ``envs.kv_cache.IncrementalLM`` passes (``attention_mask``,
    ``position_ids``, ``logits_to_keep``, ``use_cache``) and ignores what it does not need.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        *,
        eos_token_id: int = 1,
        pad_token_id: int = 0,
        max_positions: int = 512,
    ) -> None:
        super().__init__()
        if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
            raise ValueError(f"logits must be a square [V, V] table, got {tuple(logits.shape)}")
        self.table = torch.nn.Parameter(logits.float().clone(), requires_grad=False)
        self.config = SimpleNamespace(
            vocab_size=int(logits.shape[0]),
            eos_token_id=int(eos_token_id),
            pad_token_id=int(pad_token_id),
            max_position_embeddings=int(max_positions),
        )

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_) -> SimpleNamespace:
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -int(logits_to_keep) :]
        return SimpleNamespace(logits=logits)


class TabularTokenEnv(TopPTokenEnv):
    """``TopPTokenEnv`` on a Markov teacher (module docstring); exact MDP via ``tabular_mdp``.

    Arguments:
        vocab_size: V (default 8; token 0 = pad, 1 = EOS). horizon: H = max_new_tokens (4).
        start_tokens: the one-token prompts, drawn uniformly at reset (default: 2..V-1).
        logits: teacher table [V, V] (default ``markov_teacher_logits(V, seed=teacher_seed)``).
        Other keyword arguments go to ``TopPTokenEnv`` (p, reward, batch_size, seed, ...).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 8,
        horizon: int = 4,
        start_tokens=None,
        logits: torch.Tensor | None = None,
        teacher_seed: int = 0,
        **kwargs,
    ) -> None:
        if logits is None:
            logits = markov_teacher_logits(vocab_size, seed=teacher_seed)
        teacher = MarkovTeacher(logits)
        vocab = teacher.config.vocab_size
        starts = list(range(2, vocab)) if start_tokens is None else [int(t) for t in start_tokens]
        kwargs.setdefault("max_support", vocab)
        super().__init__(
            teacher, [[t] for t in starts], max_new_tokens=horizon, kv_cache=False, **kwargs
        )
        self.horizon = int(horizon)
        self.start_tokens = starts

    @property
    def num_states(self) -> int:
        return self.horizon * self.vocab_size + 1

    def state_index(self, tensordict) -> torch.Tensor:
        """int64 [...] tabular state of observations (terminal where ("next") done is set)."""
        tokens, length = tensordict.get("tokens"), tensordict.get("length")
        last = tokens.gather(-1, (length - 1).unsqueeze(-1)).squeeze(-1)
        index = tensordict.get("step") * self.vocab_size + last
        done = tensordict.get("done", None)
        if done is not None:
            index = torch.where(done.reshape(index.shape), self.num_states - 1, index)
        return index

    def tabular_mdp(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P [S, V, S], r [S, V], mask bool [S, V]) in float64, as ``tdkd.tabular`` takes them."""
        v, h, s = self.vocab_size, self.horizon, self.num_states
        table = self.teacher.table.detach().double()
        log_probs = torch.log_softmax(table, -1)  # [V, V]: row = last token
        nucleus = top_p_mask(table.float(), self.p)  # [V, V]
        if self.reward_mode == "teacher_logp":
            reward = log_probs
        elif self.reward_mode == "teacher_logp_projected":
            mass = (log_probs.exp() * nucleus).sum(-1, keepdim=True)
            reward = log_probs - mass.log()
        else:
            reward = torch.zeros_like(log_probs)
        terminal = s - 1
        P = torch.zeros(s, v, s, dtype=torch.float64)
        r = torch.zeros(s, v, dtype=torch.float64)
        mask = torch.zeros(s, v, dtype=torch.bool)
        actions = torch.arange(v)
        eos = torch.isin(actions, self.eos_token_ids)
        for t in range(h):
            rows = t * v + torch.arange(v)  # states (t, last) for every last
            r[rows] = reward.masked_fill(~nucleus, 0.0)
            mask[rows] = nucleus
            ends = eos | (t + 1 == h)
            nxt = torch.where(ends, terminal, (t + 1) * v + actions)  # [V] next state per action
            P[rows.unsqueeze(-1), actions, nxt] = 1.0
        P[terminal, :, terminal] = 1.0
        mask[terminal, 0] = True
        return P, r, mask

    def optimal_q(self, gamma: float = 0.99, alpha: float = 1.0) -> torch.Tensor:
        """Q*_p [S, V] of this env's top-p MDP (-inf outside the nucleus), exactly."""
        from tdkd.tabular import soft_value_iteration

        P, r, mask = self.tabular_mdp()
        return soft_value_iteration(P, r, gamma, mask, alpha, tol=1e-12)

    def optimal_policy(self, gamma: float = 0.99, alpha: float = 1.0) -> torch.Tensor:
        """The soft-optimal policy of M_p, softmax(Q*_p / alpha) on the nucleus: [S, V]."""
        return torch.softmax(self.optimal_q(gamma, alpha) / alpha, -1)
