"""Multi-task pieces: one student encoder with a classifier head per task, and a step sampler that picks a
task per optimizer step (kdlib.tasks.sampling: n_i ** alpha, so no large task dominates) and that task's
next batch from its own resumable batch order.

The student routes by batch: the loader tags each batch with its task, and `DistillModule` calls
`select(batch)` on a student that has it, before the forward pass. Every micro-batch of a step comes
from the same task, so the step's soft targets are that task's teacher's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from kdlib.students.adashare import POLICY_PARAMETER, TaskPolicies, gated_bert_forward, keep_layers
from kdlib.tasks.sampling import TaskSampler, TaskSamplingConfig
from kdlib.training.sampler import DistributedBatchSampler


@dataclass
class _Progress:
    epoch: int  # the lowest epoch among the tasks' batch orders (logged as the run's epoch)


class MultiTaskSampler:
    """next_step() -> this rank's micro-batches of (task, row) pairs, all of one task; state_dict is JSON."""

    def __init__(self, sizes: list[int], sampling: TaskSamplingConfig, *, micro_batch: int, grad_accum: int, rank: int,
                 world_size: int, seed: int):
        self.tasks = TaskSampler(sizes, sampling, seed=seed)  # the same draws on every rank: no communication
        self.orders = [DistributedBatchSampler(n, micro_batch=micro_batch, grad_accum=grad_accum, rank=rank,
                                               world_size=world_size, seed=seed + 1000 * t) for t, n in enumerate(sizes)]

    @property
    def state(self) -> _Progress:
        return _Progress(epoch=min(o.state.epoch for o in self.orders))

    def next_step(self) -> list[list[tuple[int, int]]]:
        task = self.tasks.next_task()
        return [[(task, i) for i in micro] for micro in self.orders[task].next_step()]

    def state_dict(self) -> dict:
        return {"tasks": self.tasks.state_dict(), "orders": [o.state_dict() for o in self.orders]}

    def load_state_dict(self, state: dict) -> None:
        self.tasks.load_state_dict(state["tasks"])
        for order, saved in zip(self.orders, state["orders"]):
            order.load_state_dict(saved)


class MultiTaskClassifier(nn.Module):
    """A BERT-family classifier's encoder shared by every task, one linear head per task (seeded per task), and
    optionally AdaShare's per-task layer policies (kdlib.students.adashare: learned, or fixed for retraining)."""

    def __init__(self, base: nn.Module, num_labels: dict[str, int], seed: int,
                 policies: Optional[TaskPolicies] = None):
        super().__init__()
        self.base = base  # e.g. BertForSequenceClassification: .bert (encoder + pooler), .dropout, .classifier
        self.config = base.config
        self.names = list(num_labels)
        heads = {}
        for t, (name, n) in enumerate(num_labels.items()):
            torch.manual_seed(seed + 10 * (t + 1))
            head = nn.Linear(base.config.hidden_size, n)
            base._init_weights(head)
            heads[name] = head
        self.heads = nn.ModuleDict(heads)
        self.base.classifier = nn.Identity()  # the heads replace it (its weights are not trained)
        self.current = 0
        self.policies = policies

    def select(self, batch: dict) -> None:
        self.current = int(batch["task"])

    def set_step(self, step: int, total: int) -> None:
        if self.policies is not None:  # the curriculum and the Gumbel temperature follow the step
            self.policies.set_step(step, total)

    def learning_rates(self) -> dict:
        """{parameter-name regex: rate} for kdlib.training.lr_groups: the learned policies' own rate."""
        if self.policies is None or self.policies.cfg is None:
            return {}
        return {POLICY_PARAMETER: self.policies.cfg.policy_learning_rate}

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **ignored):
        encoder = getattr(self.base, self.base.base_model_prefix)
        if self.policies is not None:
            if output_hidden_states:
                raise ValueError("an AdaShare student skips layers per task: hidden-state losses are not offered")
            _, pooled = gated_bert_forward(encoder, input_ids, attention_mask, self.policies.gates(self.current))
            return SequenceClassifierOutput(logits=self.heads[self.names[self.current]](self.base.dropout(pooled)))
        out = encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        pooled = self.base.dropout(out.pooler_output)
        logits = self.heads[self.names[self.current]](pooled)
        return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states if output_hidden_states else None)

    def task_model(self, name: str, labels: list[str]) -> nn.Module:
        """A plain classifier for one task: the shared encoder and that task's head, independent copies; with fixed
        AdaShare policies, only the layers the task executes (a plain model of fewer layers)."""
        model = copy.deepcopy(self.base)
        model.classifier = copy.deepcopy(self.heads[name])
        model.config = copy.deepcopy(self.config)
        if self.policies is not None:
            if self.policies.fixed is None:
                raise ValueError("task_model: learned policies are not a model yet; fix them (retraining) first")
            encoder = getattr(model, model.base_model_prefix)
            encoder.config = model.config
            keep_layers(encoder, self.policies.fixed[self.names.index(name)])
        model.config.num_labels = len(labels)
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
        model.num_labels = len(labels)
        return model
