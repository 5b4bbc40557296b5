"""``agents.make(name, student, **kwargs)``: every distillation algorithm behind one name.

    name   loss module                                   what it optimises
    bd     BellmanDistillLoss                            top-p IQ-Learn (the paper's method)
    sqn    TopPSoftQLoss                                 top-p soft Q-learning, r = log pi_T
    sac    TopPDiscreteSACLoss                           top-p discrete SAC
    iql    TopPImplicitQLoss                             top-p Implicit Q-Learning
    sft    SFTLoss                                       cross-entropy on the batch's tokens
    seqkd  SFTLoss                                       the same on teacher samples (SeqKD)
    kd     TokenDivergenceLoss(divergence="forward_kl")  KL(teacher || student)
    rkl    TokenDivergenceLoss(divergence="reverse_kl")  KL(student || teacher)
    jsd    TokenDivergenceLoss(divergence="jsd")         generalised JSD(beta)
    skl    TokenDivergenceLoss(divergence="skew_kl")     skew KL (DistiLLM)
    tvd    TokenDivergenceLoss(divergence="tvd")         total variation

Keyword arguments go to the loss module's constructor (an unknown one raises ValueError naming
the valid ones). Modules are imported lazily, so ``import agents`` stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

__all__ = ["ALGORITHMS", "make"]

# name -> (module, class, fixed keyword arguments)
ALGORITHMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bd": ("agents.losses.bellman_distill", "BellmanDistillLoss", {}),
    "sqn": ("agents.losses.soft_q", "TopPSoftQLoss", {}),
    "sac": ("agents.losses.sac", "TopPDiscreteSACLoss", {}),
    "iql": ("agents.losses.implicit_q", "TopPImplicitQLoss", {}),
    "sft": ("agents.losses.bc", "SFTLoss", {}),
    "seqkd": ("agents.losses.bc", "SFTLoss", {}),
    "kd": ("agents.losses.bc", "TokenDivergenceLoss", {"divergence": "forward_kl"}),
    "rkl": ("agents.losses.bc", "TokenDivergenceLoss", {"divergence": "reverse_kl"}),
    "jsd": ("agents.losses.bc", "TokenDivergenceLoss", {"divergence": "jsd"}),
    "skl": ("agents.losses.bc", "TokenDivergenceLoss", {"divergence": "skew_kl"}),
    "tvd": ("agents.losses.bc", "TokenDivergenceLoss", {"divergence": "tvd"}),
}


def loss_class(name: str) -> type:
    """The loss module class behind an algorithm name."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    module, cls, _ = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)


def make(name: str, student: nn.Module, **kwargs: Any) -> nn.Module:
    """Build the loss module of algorithm ``name`` around ``student``.

    >>> from tdkd.models import tiny_causal_lm
    >>> type(make("kd", tiny_causal_lm(16, hidden_size=8, num_layers=1, num_heads=2))).__name__
    'TokenDivergenceLoss'
    """
    cls = loss_class(name)
    fixed = ALGORITHMS[name][2]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"algorithm {name!r} fixes {clash}; pick another algorithm name instead")
    accepted = {
        param.name
        for param in inspect.signature(cls.__init__).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    } - set(fixed)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"algorithm {name!r} ({cls.__name__}) got unknown arguments {unknown}; valid: "
            f"{sorted(accepted)}"
        )
    return cls(student, **fixed, **kwargs)
