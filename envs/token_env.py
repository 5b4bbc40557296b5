"""``TopPTokenEnv``: a natively batched TorchRL env on the teacher's top-p MDP (PAPER.md s.2).

One teacher serves all B rows through a right-aligned KV cache (``envs.kv_cache``); a step
appends one token per row and advances the teacher by that one token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from envs.kv_cache import IncrementalLM, context_length, output_vocab_size
from tdkd.topp import check_p, top_p_mask_and_support

__all__ = ["REWARD_MODES", "TopPTokenEnv", "encode_prompts", "nucleus_view"]

logger = logging.getLogger(__name__)

REWARD_MODES = ("teacher_logp", "teacher_logp_projected", "zero")
ACTION_SPACES = ("token", "support")
OUT_OF_SUPPORT = ("error", "allow")


def encode_prompts(prompts, *, tokenizer=None, vocab_size: int | None = None) -> list[torch.Tensor]:
    """Prompts as 1-D int64 tensors: from lists of ids / 1-D tensors, or from text + tokenizer.

    Raises ValueError for an empty collection, an empty prompt, text without a tokenizer, or an
    id outside [0, vocab_size).
    """
    if isinstance(prompts, (str, torch.Tensor)) and not (
        isinstance(prompts, torch.Tensor) and prompts.dim() == 2
    ):
        raise ValueError(
            "prompts must be a collection of prompts (lists of token ids or strings), got a "
            f"single {type(prompts).__name__}; wrap it in a list"
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer was given; pass tokenizer=")
            prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(prompt)
        if ids.numel() == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(
                f"prompt {i} must be a 1-D sequence of int token ids, got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.long()
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"prompt {i} has a token id outside the vocabulary [0, {vocab_size}): "
                f"min {int(ids.min())}, max {int(ids.max())}"
            )
        encoded.append(ids)
    return encoded


def _pad_last(values: torch.Tensor, width: int, fill) -> torch.Tensor:
    """[B, k] -> [B, width] (k <= width), ``fill`` in the new columns."""
    extra = width - values.shape[-1]
    if extra == 0:
        return values
    return torch.cat([values, values.new_full((*values.shape[:-1], extra), fill)], dim=-1)


def nucleus_view(logits: torch.Tensor, p: float, width: int) -> dict[str, torch.Tensor]:
    """Everything the env exposes about the teacher's nucleus, from [B, V] next-token logits.

    The nucleus A_p and its sparse view come from one ranking
    (``tdkd.topp.top_p_mask_and_support``); the sparse view keeps the top ``width`` entries,
    padded to exactly ``width`` columns (the env's fixed observation shape):

        support_ids/log_probs/mask [B, width], covered_mass = sum_{kept} pi_T,
        dropped_mass = sum_{A_p} pi_T - covered_mass, nucleus_mass = covered + dropped.

    Args:
        logits: [B, V] teacher logits; p: nucleus mass; width: K of the sparse view (at most V).

    Returns a dict with those plus ``log_probs`` [B, V] (full log-softmax), ``action_mask`` bool
    [B, V] (the whole nucleus) and ``nucleus_size`` int64 [B].

    >>> view = nucleus_view(torch.tensor([[2.0, 1.0, 0.0]]), 0.7, width=2)
    >>> view["support_ids"].tolist(), view["action_mask"].tolist(), view["nucleus_size"].tolist()
    ([[0, 1]], [[True, True, False]], [2])
    """
    width = min(int(width), logits.shape[-1])
    action_mask, support = top_p_mask_and_support(logits, p, max_support=width)
    return {
        "log_probs": torch.log_softmax(logits.float(), dim=-1),
        "action_mask": action_mask,
        "support_ids": _pad_last(support.ids, width, 0),
        "support_log_probs": _pad_last(support.log_probs, width, float("-inf")),
        "support_mask": _pad_last(support.mask, width, False),
        "nucleus_size": action_mask.sum(-1),
        "covered_mass": support.covered_mass,
        "dropped_mass": support.dropped_mass,
        "nucleus_mass": support.covered_mass.double() + support.dropped_mass.double(),
    }


class TopPTokenEnv(EnvBase):
    """Token-level MDP of a teacher LM restricted to its top-p nucleus, B rows at once.

    Description:
        State s_t = prompt + tokens generated so far; action a_t = next token; s_{t+1} = s_t + a_t.
        The admissible actions are the teacher's nucleus A_p(s_t) (``tdkd.topp``). Reset draws
        prompts uniformly (seeded) from ``prompts`` and runs the teacher over each prompt once;
        each step runs the teacher on the one new token per row (KV cache). Rows reset
        independently (TorchRL ``"_reset"`` mask): only the reset rows' prompts are prefilled.

    Observation (batch [B]; L = max_prompt_tokens + max_new_tokens, K = max_support):
        tokens int64 [B, L] prompt + response, right-padded with pad_token_id;
        attention_mask bool [B, L]; length, prompt_length, step int64 [B] (step = tokens generated);
        support_ids int64 [B, K] the nucleus in ranking order (descending prob, ties by id),
        support_log_probs float32 [B, K] log pi_T(a|s) (-inf at padding), support_mask bool [B, K];
        nucleus_size int64 [B] |A_p(s)| (may exceed K: the sparse view is capped, the MDP is not);
        covered_mass / dropped_mass float32 [B] teacher mass kept in / cut from the sparse view;
        action_mask bool [B, V] the whole nucleus (what TorchRL's ``ActionMask`` reads);
        teacher_log_prob float32 [B] log pi_T(a_{t-1}|s_{t-1}) of the action that led here
        (0 after reset); out_of_support bool [B] that action was outside the nucleus.

    Action space:
        ``action_space="token"``: "action" int64 [B], a token id; spec ``Categorical(V)`` whose
        mask is the nucleus, updated every step. ``"support"``: an index into support_ids,
        ``Categorical(K)`` masked by support_mask (only the kept entries are reachable).

    Reward ("reward" float32 [B, 1], ``reward=``):
        ``teacher_logp``: log pi_T(a|s);
        ``teacher_logp_projected``: log proj_p pi_T(a|s) = log pi_T(a|s) - log pi_T(A_p(s)|s);
        ``zero``: 0 (inverse RL: the learner infers the reward).

    Episode end:
        terminated when an EOS token is emitted; truncated after ``max_new_tokens`` tokens.
        Stepping a finished row without resetting it raises ValueError.

    Out-of-nucleus actions:
        ``out_of_support="error"`` (default) raises ValueError naming row, token and step;
        ``"allow"`` accepts it, the reward uses the same formula (the teacher's log-prob; the
        projected mode still subtracts log pi_T(A_p)), and ``out_of_support`` is True.

    Arguments:
        teacher: HF causal LM (eval mode). prompts: token-id lists / 1-D tensors, or strings with
        ``tokenizer``. batch_size: B >= 1. p: nucleus mass. max_new_tokens: response budget.
        max_support: width K of the sparse view (None = V). max_prompt_tokens: prompt budget
        (default: the longest prompt). eos_token_id: int or ids (default: the teacher config's).
        pad_token_id: filler (default: config pad, else first EOS). kv_cache: False re-runs the
        whole prefix every step (the naive reference). seed: prompt-draw seed.
    """

    def __init__(
        self,
        teacher,
        prompts,
        *,
        batch_size: int = 1,
        p: float = 0.8,
        max_new_tokens: int = 64,
        max_support: int | None = 256,
        max_prompt_tokens: int | None = None,
        reward: str = "teacher_logp",
        action_space: str = "token",
        out_of_support: str = "error",
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        tokenizer=None,
        kv_cache: bool = True,
        seed: int | None = None,
    ) -> None:
        batch = int(batch_size)
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        for name, value, allowed in (
            ("reward", reward, REWARD_MODES),
            ("action_space", action_space, ACTION_SPACES),
            ("out_of_support", out_of_support, OUT_OF_SUPPORT),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {name}={value!r}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got max_new_tokens={max_new_tokens}")
        device = next(teacher.parameters()).device
        super().__init__(batch_size=torch.Size([batch]), device=device)
        config = teacher.config
        self.teacher = teacher
        self.vocab_size = output_vocab_size(teacher)
        self.p = check_p(p)
        self.max_new_tokens = int(max_new_tokens)
        self.reward_mode = reward
        self.action_space_kind = action_space
        self.out_of_support = out_of_support
        self.prompts = encode_prompts(prompts, tokenizer=tokenizer, vocab_size=self.vocab_size)
        longest = max(int(x.numel()) for x in self.prompts)
        self.max_prompt_tokens = longest if max_prompt_tokens is None else int(max_prompt_tokens)
        if longest > self.max_prompt_tokens:
            raise ValueError(
                f"a prompt has {longest} tokens, more than max_prompt_tokens={self.max_prompt_tokens}; "
                "raise max_prompt_tokens or shorten the prompts"
            )
        self.max_length = self.max_prompt_tokens + self.max_new_tokens
        context = context_length(teacher)
        if context is not None and self.max_length > context:
            raise ValueError(
                f"prompts of up to {self.max_prompt_tokens} tokens plus max_new_tokens="
                f"{self.max_new_tokens} exceed the teacher's context of {context} positions; "
                "shorten the prompts or lower max_new_tokens"
            )
        if max_support is not None and int(max_support) < 1:
            raise ValueError(f"max_support must be >= 1 or None, got max_support={max_support}")
        self.support_width = (
            self.vocab_size if max_support is None else min(int(max_support), self.vocab_size)
        )
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ValueError("the teacher config has no eos_token_id; pass eos_token_id=")
        self.eos_token_ids = torch.as_tensor(
            [eos] if isinstance(eos, int) else list(eos), dtype=torch.long
        )
        if pad_token_id is None:
            pad_token_id = (
                config.pad_token_id
                if config.pad_token_id is not None
                else int(self.eos_token_ids[0])
            )
        self.pad_token_id = int(pad_token_id)
        self.lm = IncrementalLM(teacher, use_cache=kv_cache, pad_token_id=self.pad_token_id)
        self._generator = torch.Generator()
        self._generator.manual_seed(
            int(torch.empty((), dtype=torch.int64).random_()) if seed is None else int(seed)
        )
        self._state: TensorDict | None = None
        self._log_probs: torch.Tensor | None = None
        self._nucleus_mass: torch.Tensor | None = None
        self._done = torch.ones(batch, dtype=torch.bool, device=device)
        self._make_specs()

    # ----------------------------------------------------------------------------- specs
    def _make_specs(self) -> None:
        length, k, v = self.max_length, self.support_width, self.vocab_size
        shape, dev = self.batch_size, self.device

        def ints(high: int, *extra: int) -> Bounded:
            return Bounded(0, high, shape=(*shape, *extra), dtype=torch.int64, device=dev)

        def floats(*extra: int) -> Unbounded:
            return Unbounded(shape=(*shape, *extra), dtype=torch.float32, device=dev)

        def flags(n: int) -> Binary:
            return Binary(n=n, shape=(*shape, n), dtype=torch.bool, device=dev)

        self.observation_spec = Composite(
            tokens=ints(v - 1, length),
            attention_mask=flags(length),
            length=ints(length),
            prompt_length=ints(self.max_prompt_tokens),
            step=ints(self.max_new_tokens),
            support_ids=ints(v - 1, k),
            support_log_probs=floats(k),
            support_mask=flags(k),
            nucleus_size=ints(v),
            covered_mass=floats(),
            dropped_mass=floats(),
            action_mask=flags(v),
            teacher_log_prob=floats(),
            out_of_support=Categorical(2, shape=shape, dtype=torch.bool, device=dev),
            shape=shape,
            device=dev,
        )
        n_actions = v if self.action_space_kind == "token" else k
        self.action_spec = Categorical(n_actions, shape=shape, dtype=torch.int64, device=dev)
        self.reward_spec = Unbounded(shape=(*shape, 1), dtype=torch.float32, device=dev)
        self.done_spec = Composite(
            done=Categorical(2, shape=(*shape, 1), dtype=torch.bool, device=dev),
            terminated=Categorical(2, shape=(*shape, 1), dtype=torch.bool, device=dev),
            truncated=Categorical(2, shape=(*shape, 1), dtype=torch.bool, device=dev),
            shape=shape,
            device=dev,
        )

    # ----------------------------------------------------------------------------- helpers
    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self._generator.manual_seed(int(seed))

    def _draw_prompts(self, n: int) -> list[torch.Tensor]:
        index = torch.randint(len(self.prompts), (n,), generator=self._generator)
        return [self.prompts[int(i)] for i in index]

    _NUCLEUS_KEYS = (
        "support_ids",
        "support_log_probs",
        "support_mask",
        "nucleus_size",
        "covered_mass",
        "dropped_mass",
        "action_mask",
    )

    def _observe(self, logits: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Refresh the nucleus entries of ``rows`` (all if None) from next-token logits."""
        view = nucleus_view(logits, self.p, self.support_width)
        if rows is None:
            self._log_probs, self._nucleus_mass = view["log_probs"], view["nucleus_mass"]
            for key in self._NUCLEUS_KEYS:
                self._state.set(key, view[key])
        else:  # in place: outputs are clones of the state, never views of it
            self._log_probs[rows] = view["log_probs"]
            self._nucleus_mass[rows] = view["nucleus_mass"]
            for key in self._NUCLEUS_KEYS:
                self._state.get(key)[rows] = view[key]

    def _update_action_mask(self) -> None:
        key = "action_mask" if self.action_space_kind == "token" else "support_mask"
        self.action_spec.update_mask(self._state.get(key).clone())

    def _output(
        self, done: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor
    ) -> TensorDict:
        out = self._state.clone()
        out.set("done", done.unsqueeze(-1))
        out.set("terminated", terminated.unsqueeze(-1))
        out.set("truncated", truncated.unsqueeze(-1))
        return out

    # ----------------------------------------------------------------------------- reset
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        batch = self.batch_size[0]
        reset = None if tensordict is None else tensordict.get("_reset", None)
        if reset is None or self._state is None:
            rows = torch.arange(batch, device=self.device)
        else:
            rows = reset.reshape(batch).nonzero().squeeze(-1)
        if rows.numel() == 0:  # nothing to reset: the current state, unchanged
            false = torch.zeros(batch, dtype=torch.bool, device=self.device)
            return self._output(self._done.clone(), false, false)
        prompts = self._draw_prompts(int(rows.numel()))
        full = rows.numel() == batch
        if full:
            self._state = TensorDict(
                {
                    "tokens": torch.full(
                        (batch, self.max_length), self.pad_token_id, dtype=torch.long
                    ),
                    "attention_mask": torch.zeros((batch, self.max_length), dtype=torch.bool),
                    "length": torch.zeros(batch, dtype=torch.long),
                    "prompt_length": torch.zeros(batch, dtype=torch.long),
                    "step": torch.zeros(batch, dtype=torch.long),
                    "teacher_log_prob": torch.zeros(batch),
                    "out_of_support": torch.zeros(batch, dtype=torch.bool),
                },
                batch_size=self.batch_size,
                device=self.device,
            )
        state = self._state
        tokens, attention = state.get("tokens").clone(), state.get("attention_mask").clone()
        for row, prompt in zip(rows.tolist(), prompts, strict=True):
            n = prompt.numel()
            tokens[row] = self.pad_token_id
            tokens[row, :n] = prompt
            attention[row] = False
            attention[row, :n] = True
        lengths = torch.tensor([p.numel() for p in prompts], dtype=torch.long, device=self.device)
        state.set("tokens", tokens)
        state.set("attention_mask", attention)
        for key, value in (
            ("length", lengths),
            ("prompt_length", lengths),
            ("step", 0),
            ("teacher_log_prob", 0.0),
            ("out_of_support", False),
        ):
            column = state.get(key).clone()
            column[rows] = value
            state.set(key, column)
        if full:
            logits = self.lm.start(prompts)
            self._observe(logits, None)
        else:
            logits = self.lm.restart_rows(rows, prompts)
            self._observe(logits, rows)
        self._done = self._done.clone()
        self._done[rows] = False
        self._update_action_mask()
        false = torch.zeros(batch, dtype=torch.bool, device=self.device)
        return self._output(self._done.clone(), false, false)

    # ----------------------------------------------------------------------------- step
    def _check_action(self, action) -> torch.Tensor:
        batch = self.batch_size[0]
        if (
            not isinstance(action, torch.Tensor)
            or action.is_floating_point()
            or action.dtype == torch.bool
        ):
            raise ValueError(
                f"action must be an integer tensor of shape ({batch},), got "
                f"{getattr(action, 'dtype', type(action).__name__)}"
            )
        if tuple(action.shape) != (batch,):
            raise ValueError(
                f"action must have shape ({batch},) (one token per row), got {tuple(action.shape)}"
            )
        high = self.vocab_size if self.action_space_kind == "token" else self.support_width
        if int(action.min()) < 0 or int(action.max()) >= high:
            what = "token id" if self.action_space_kind == "token" else "support index"
            raise ValueError(
                f"action has a {what} outside [0, {high}): min {int(action.min())}, max {int(action.max())}"
            )
        return action.long()

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._state is None:
            raise ValueError("the env was stepped before reset(); call env.reset() first")
        if "_step" in tensordict.keys():
            # TorchRL's rollout(break_when_all_done=True) steps only the rows named by "_step"
            # and never resets finished ones; this env advances every row in lock step.
            raise ValueError(
                "TopPTokenEnv steps all rows together; use env.rollout(..., "
                "break_when_any_done=False) (finished rows are reset) or a TorchRL Collector "
                "instead of break_when_all_done=True"
            )
        action = self._check_action(tensordict.get("action"))
        if bool(self._done.any()):
            row = int(self._done.nonzero()[0])
            raise ValueError(
                f"row {row} is done; reset it (TorchRL '_reset' mask) before stepping it again"
            )
        state = self._state
        if self.action_space_kind == "token":
            token = action
            inside = state.get("action_mask").gather(-1, token[:, None]).squeeze(-1)
        else:
            token = state.get("support_ids").gather(-1, action[:, None]).squeeze(-1)
            inside = state.get("support_mask").gather(-1, action[:, None]).squeeze(-1)
            if not bool(inside.all()):
                # Past a row's support there is padding, not a token: never accepted.
                row = int((~inside).nonzero()[0])
                raise ValueError(
                    f"row {row}: support index {int(action[row])} points at padding (the row's "
                    f"support has {int(state.get('support_mask')[row].sum())} entries); sample "
                    "support indices under 'support_mask'"
                )
        step = state.get("step")
        if self.out_of_support == "error" and not bool(inside.all()):
            row = int((~inside).nonzero()[0])
            raise ValueError(
                f"row {row}: token {int(token[row])} at step {int(step[row])} is outside the teacher's "
                f"top-p nucleus (p={self.p}, {int(state.get('nucleus_size')[row])} tokens); mask the "
                "policy with the 'action_mask' entry (TorchRL ActionMask) or pass out_of_support='allow'"
            )
        teacher_log_prob = self._log_probs.gather(-1, token[:, None]).squeeze(-1).float()
        if self.reward_mode == "teacher_logp":
            reward = teacher_log_prob
        elif self.reward_mode == "teacher_logp_projected":
            reward = teacher_log_prob - self._nucleus_mass.log().float()
        else:
            reward = torch.zeros_like(teacher_log_prob)
        length = state.get("length")
        rows = torch.arange(self.batch_size[0], device=self.device)
        tokens = state.get("tokens").clone()
        attention = state.get("attention_mask").clone()
        tokens[rows, length] = token
        attention[rows, length] = True
        step = step + 1
        terminated = torch.isin(token, self.eos_token_ids.to(token.device))
        truncated = (step >= self.max_new_tokens) & ~terminated
        state.update(
            {
                "tokens": tokens,
                "attention_mask": attention,
                "length": length + 1,
                "step": step,
                "teacher_log_prob": teacher_log_prob,
                "out_of_support": ~inside,
            }
        )
        self._observe(self.lm.append(token), None)
        self._done = terminated | truncated
        self._update_action_mask()
        out = self._output(self._done.clone(), terminated, truncated)
        out.set("reward", reward.unsqueeze(-1))
        return out
