"""TorchRL loss modules: the top-p TD family and the behaviour-cloning baselines."""

from __future__ import annotations

from agents.losses.bc import SFTLoss, TokenDivergenceLoss
from agents.losses.bellman_distill import BellmanDistillLoss
from agents.losses.implicit_q import TopPImplicitQLoss
from agents.losses.sac import TopPDiscreteSACLoss
from agents.losses.soft_q import TopPSoftQLoss

__all__ = [
    "BellmanDistillLoss",
    "SFTLoss",
    "TokenDivergenceLoss",
    "TopPDiscreteSACLoss",
    "TopPImplicitQLoss",
    "TopPSoftQLoss",
]
