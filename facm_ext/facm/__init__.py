"""FACM (Flow-Anchored Consistency Models): the training objective, teacher pretraining, MeanFlow, samplers.

- :func:`sample_t` — per-sample training times (arctan-lognormal default, logit-normal option).
- :func:`facm_loss` — FM anchor at condition 2 - t + CM accelerator through one forward-mode JVP.
- :func:`teacher_velocity` — guided target velocity with a guidance interval.
- :func:`stage1_loss` — teacher pretraining on the expanded interval (half the batch at t, half at 2 - t).
- :func:`meanflow_loss` — MeanFlow as a second objective, with :class:`TwoTimeModel`.
- :class:`GraphedStudentJVP` — a jvp_fn for facm_loss replaying the student's JVP from a CUDA graph.
- :func:`sample` (consistency sampler, fresh noise at each re-noising), :func:`sample_flow` (Euler, FM branch).

The trainer is ``python -m facm_ext.train``.
"""

from facm_ext.facm.objective import (ConditionedModel, GraphedStudentJVP, adaptive_l2, drop_labels, facm_loss,
                                     flow_matching_loss, meanflow_loss, sample_t, stage1_loss, teacher_velocity,
                                     torch_func_jvp)
from facm_ext.facm.sampling import sample, sample_flow
from facm_ext.facm.two_time import TwoTimeModel

__all__ = ["ConditionedModel", "GraphedStudentJVP", "TwoTimeModel", "adaptive_l2", "drop_labels", "facm_loss",
           "flow_matching_loss", "meanflow_loss", "sample", "sample_flow", "sample_t", "stage1_loss",
           "teacher_velocity", "torch_func_jvp"]
