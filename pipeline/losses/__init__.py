"""Distillation objectives computed from student embeddings and cached teacher embeddings.

Each loss is an ``nn.Module`` built by name from ``LOSSES``; ``forward(batch)`` returns a scalar.
A loss declares the cache fields it reads in ``requires`` so a run missing one fails before its
first step. ``build_objective`` turns the ``train.losses`` list of params into a weighted sum
whose weights a balancer from ``BALANCERS`` sets.

Modules: ``base`` (batch, registry, objective, requirement checks), ``basic`` (contrastive,
feature, similarity_kl), one module per paper (``clip_kd``, ``dsmd``, ``structure``, ``mcad``,
``epmvg``) and ``balancer``. Importing the package registers every loss.
"""
from pipeline.losses.balancer import BALANCERS, DSMDBalancer, FixedBalancer, LossBalancer
from pipeline.losses.base import (LOSSES, CombinedLoss, DistillBatch, DistillLoss, EnsembleTerm,
                                  LossTerm, build_objective, check_requirements, info_nce, row_kl,
                                  teacher_similarity_logits)
from pipeline.losses.basic import ContrastiveLoss, FeatureLoss, SimilarityKL
from pipeline.losses.clip_kd import FDLoss, ICLLoss
from pipeline.losses.dsmd import (DSMDContrastive, DSMDFeature, DSMDHardNegative, DSMDSimilarity,
                                  MultiScaleLoss)
from pipeline.losses.epmvg import EpmVGLoss
from pipeline.losses.mcad import Integration, MCADCandidates, MCADFeature
from pipeline.losses.structure import SARDMatching, SARDRelational, SARDRepresentation

__all__ = [
    "BALANCERS", "LOSSES", "CombinedLoss", "ContrastiveLoss",
    "DSMDBalancer", "DSMDContrastive", "DSMDFeature", "DSMDHardNegative", "DSMDSimilarity",
    "DistillBatch", "DistillLoss", "EnsembleTerm", "EpmVGLoss", "FDLoss", "FeatureLoss", "FixedBalancer",
    "ICLLoss", "Integration", "LossBalancer", "LossTerm", "MCADCandidates", "MCADFeature",
    "MultiScaleLoss", "SARDMatching", "SARDRelational", "SARDRepresentation", "SimilarityKL",
    "build_objective", "check_requirements", "info_nce", "row_kl",
    "teacher_similarity_logits",
]
