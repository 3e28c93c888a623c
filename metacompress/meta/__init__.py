"""metacompress.meta: a stand-alone meta-learning core (it knows nothing of pruning).

Tasks and distributions (``Task``, ``Sinusoid``, ``NWayKShot``, ``digits_rot``), gradient-based
meta-learners on ``torch.func`` (``MAML``, ``FOMAML``, ``MetaSGD``, ``ANIL``, ``Reptile``), the
transfer-learning baselines, evolution strategies (``ES``), ``torch.distributed`` helpers
(``meta.distributed``: sharded work, launchers) and data-parallel training on them
(``meta.data_parallel``).
"""

from metacompress.meta.baselines import (
    ALGORITHMS,
    JointPretrain,
    build_learner,
    compare,
    finetune_evaluate,
    mean_ci95,
    meta_train,
)
from metacompress.meta.es import ES
from metacompress.meta.maml import ANIL, FOMAML, MAML, MetaLearner, MetaSGD, head_names
from metacompress.meta.reptile import Reptile
from metacompress.meta.tasks import (
    NWayKShot,
    Sinusoid,
    Task,
    TaskDistribution,
    TaskSpec,
    build_distribution,
    default_model,
    digits_rot,
    parse_task_spec,
    split_classes,
)

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "ES",
    "FOMAML",
    "MAML",
    "JointPretrain",
    "MetaLearner",
    "MetaSGD",
    "NWayKShot",
    "Reptile",
    "Sinusoid",
    "Task",
    "TaskDistribution",
    "TaskSpec",
    "build_distribution",
    "build_learner",
    "compare",
    "default_model",
    "digits_rot",
    "finetune_evaluate",
    "head_names",
    "mean_ci95",
    "meta_train",
    "parse_task_spec",
    "split_classes",
]
