"""The promotion gate: a new model replaces the ``current`` one only when it is not worse on the same test split.

``current`` is a stable model location (a folder: ``model.safetensors`` + ``model.json``) that the nightly
deployment's ``model`` parameter points at. After training, the model found there is evaluated on the NEW run's
test split (the images the training pipeline already decoded, resized when the current model takes another input
size), and each task's headline metric (``kind.headline[0]``, in its kind's direction) is compared with the new
model's. No task worse by more than ``tolerance`` (absolute): the new artifact is copied over the current one,
weights first and card last, then ``promotion.json`` records it. Otherwise nothing at ``current`` changes, and
the caller refuses (the CLI exits 3, the flow ends Failed with the comparison as an artifact).

Why the card goes last: ``load_artifact`` checks the weights against the card's version hash, so a reader between
the two writes sees the old card with the new weights and refuses them loudly (``ArtifactError``); it can never
tag with weights the card does not describe. Each file is written whole (``write_bytes_atomic``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catalog_tagger.config import TaskConfig, TaskSpec
from catalog_tagger.errors import ArtifactError, UserError
from catalog_tagger.kinds import denormalise, format_metric, kind_of, normalise
from catalog_tagger.model.artifact import ModelCard, load_artifact, load_card
from catalog_tagger.model.inference import autocast
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.model.weights import CARD_FILE, WEIGHTS_FILE
from catalog_tagger.storage import filesystem, join, read_bytes, redact, retry_transient, strip, write_bytes_atomic
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData, model_inputs
from catalog_tagger.train.evaluate import EVAL_BATCH, Evaluation

log = logging.getLogger(__name__)

EXIT_NOT_PROMOTED = 3  # `catalog-tagger train --promote-to`: the model is trained and saved, but not promoted
PROMOTION_FILE = "promotion.json"  # beside the current model: the last promotion (versions, comparison, time)
DEFAULT_TOLERANCE = 0.01  # absolute, on each task's headline metric (accuracy, micro-F1: one point in 100)

# verdicts of one task; the first three promote, the last two refuse
BETTER, NEW_TASK, WITHIN = "better or equal", "new task (not in the current model)", "within tolerance"
WORSE, MISSING, NOT_COMPARABLE = "worse", "missing in the new model", "not comparable"
REFUSING = (WORSE, MISSING, NOT_COMPARABLE)


@dataclass(frozen=True)
class TaskVerdict:
    """One task of the comparison: both models' headline metric on the same test images, and the verdict."""

    task: str
    metric: str | None  # the kind's first headline metric (None when the task is not comparable)
    higher_is_better: bool
    current: float | None
    new: float | None
    verdict: str
    note: str = ""

    @property
    def refuses(self) -> bool:
        return self.verdict in REFUSING

    @property
    def change(self) -> float | None:
        """new - current (positive is better for accuracy, worse for an error such as MAE)."""
        return None if self.current is None or self.new is None else self.new - self.current


@dataclass
class Gate:
    """The gate's decision for one trained model; ``to_dict`` is what the flow, the CLI and promotion.json show."""

    promote_to: str
    tolerance: float
    new_version: str
    current_version: str | None  # None: no model at ``promote_to`` yet (the first one is promoted)
    tasks: list[TaskVerdict] = field(default_factory=list)
    test_images: int = 0
    promoted: bool = False

    @property
    def accepted(self) -> bool:
        return not any(t.refuses for t in self.tasks)

    def message(self) -> str:
        """One line: what was decided and, when refused, the task(s) that made it."""
        where = redact(self.promote_to)
        if self.current_version is None:
            return f"promoted {self.new_version} to {where}: no current model there (the first one)"
        if self.accepted:
            return (
                f"promoted {self.new_version} to {where} (was {self.current_version}): no task worse than the current "
                f"model by more than {self.tolerance:g} on the same {self.test_images} test images"
            )
        worse = "; ".join(_why(t, self.tolerance) for t in self.tasks if t.refuses)
        return (
            f"not promoted: {self.new_version} is worse than the current model {self.current_version} at {where} on "
            f"the same {self.test_images} test images: {worse}; {where} is unchanged"
        )

    def to_dict(self) -> dict[str, Any]:
        tasks = [{**asdict(t), "change": t.change, "refuses": t.refuses} for t in self.tasks]
        return {
            "promoted": self.promoted,
            "message": self.message(),
            "promote_to": redact(self.promote_to),
            "tolerance": self.tolerance,
            "new_version": self.new_version,
            "current_version": self.current_version,
            "test_images": self.test_images,
            "tasks": tasks,
        }


def _why(t: TaskVerdict, tolerance: float) -> str:
    if t.verdict != WORSE:
        return f"task {t.task} is {t.verdict}" + (f" ({t.note})" if t.note else "")
    direction = "higher" if t.higher_is_better else "lower"
    return (
        f"task {t.task} {t.metric} {format_metric(t.new)} vs {format_metric(t.current)} ({direction} is better; "
        f"tolerance {tolerance:g})"
    )


# --------------------------------------------------------------------------------------------- the comparison
def comparable(current: TaskSpec, new: TaskSpec) -> str | None:
    """Why the current model's ``current`` head cannot be scored against ``new``'s targets, or None when it can."""
    if current.kind != new.kind:
        return f"its kind changed from {current.kind} to {new.kind}"
    return None


def judge(
    new_tasks: Sequence[TaskSpec],
    new_metrics: dict[str, dict[str, Any]],
    current_tasks: Sequence[TaskSpec],
    current_metrics: dict[str, dict[str, Any]],
    tolerance: float,
) -> list[TaskVerdict]:
    """Each task's verdict. Only shared tasks count; a current task the new model lacks refuses the promotion (the
    nightly output would lose a column); a task only the new model has is listed and never refuses."""
    new_by_name = {t.name: t for t in new_tasks}
    out: list[TaskVerdict] = []
    for cur in current_tasks:
        new = new_by_name.get(cur.name)
        kind = kind_of(cur)
        if new is None or (why := comparable(cur, new)) is not None:
            verdict, note = (MISSING, "") if new is None else (NOT_COMPARABLE, why or "")
            out.append(TaskVerdict(cur.name, None, kind.higher_is_better, None, None, verdict, note))
            continue
        key = kind.headline[0]
        a, b = current_metrics.get(cur.name, {}).get(key), new_metrics.get(cur.name, {}).get(key)
        out.append(
            TaskVerdict(cur.name, key, kind.higher_is_better, a, b, _verdict(a, b, kind.higher_is_better, tolerance))
        )
    shared = {t.name for t in current_tasks}
    for t in new_tasks:
        if t.name not in shared:
            key = kind_of(t).headline[0]
            value = new_metrics.get(t.name, {}).get(key)
            out.append(TaskVerdict(t.name, key, kind_of(t).higher_is_better, None, value, NEW_TASK))
    return out


def _verdict(current: float | None, new: float | None, higher_is_better: bool, tolerance: float) -> str:
    """better or equal / within tolerance / worse; a metric missing on either side (no labelled test image of the
    task: both sides see the same images) cannot tell, and does not refuse."""
    if current is None or new is None:
        return BETTER
    loss = (current - new) if higher_is_better else (new - current)  # how much worse the new model is
    if loss <= 0:
        return BETTER
    return WITHIN if loss <= tolerance + 1e-12 else WORSE


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC images resized to ``size`` px (antialiased bilinear): the cache at another model's input size.
    Serving decodes from the original file; resizing the decoded cache is the close, cheap equivalent."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


@torch.inference_mode()
def model_scores(
    model: MultiHeadModel, images: np.ndarray, device: torch.device, *, amp: bool
) -> dict[str, np.ndarray]:
    """Every head's activated outputs (probabilities, or the normalised value) for uint8 NHWC ``images``."""
    model.eval()
    tasks = model.tasks.tasks
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    gen = torch.Generator()
    for start in range(0, images.shape[0], EVAL_BATCH):
        x = torch.from_numpy(images[start : start + EVAL_BATCH]).to(device)
        with autocast(device, bf16_only=True) if amp else nullcontext():
            out = model(model_inputs(model, x, None, gen))
        for t in tasks:
            parts[t.name].append(kind_of(t).activate(out.logits[t.name]).cpu().numpy())
    return {
        t.name: np.concatenate(p) if p else np.zeros((0, kind_of(t).outputs(t)), np.float32)
        for t, p in zip(tasks, parts.values(), strict=True)
    }


def remap(
    cur: TaskSpec, new: TaskSpec, scores: np.ndarray, thresholds: list[float] | None
) -> tuple[np.ndarray, list[float] | None]:
    """The current head's outputs in the new task's terms: label columns by name (a label the current model does not
    know scores 0 and is never predicted), a regression value from the current range to the new one."""
    if new.labels and cur.labels != new.labels:
        col = {label: i for i, label in enumerate(cur.labels)}
        mapped = np.zeros((scores.shape[0], len(new.labels)), np.float32)
        new_thresholds = [1.0] * len(new.labels)
        for j, label in enumerate(new.labels):
            if label in col:
                mapped[:, j] = scores[:, col[label]]
                if thresholds is not None:
                    new_thresholds[j] = thresholds[col[label]]
        return mapped, new_thresholds if thresholds is not None else None
    if not new.labels and cur.range != new.range:
        return normalise(new, denormalise(cur, scores.astype(np.float64))).astype(np.float32), thresholds
    return scores, thresholds


def current_metrics(
    model: MultiHeadModel,
    card: ModelCard,
    new_tasks: TaskConfig,
    data: TrainData,
    test: np.ndarray,
    device: torch.device,
    *,
    amp: bool,
) -> dict[str, dict[str, Any]]:
    """The current model's metrics on the new run's test rows, for the tasks it shares (comparably) with the new
    model, at its own thresholds, computed by each kind's ``metrics`` against the new targets."""
    idx = np.sort(test)
    images = data.images[idx]
    if images.shape[1] != card.image_size:
        log.info(
            "promotion gate: test images resized %d -> %d px for the current model", images.shape[1], card.image_size
        )
        images = resize_images(images, card.image_size)
    scores = model_scores(model, images, device, amp=amp)
    new_by_name = {t.name: t for t in new_tasks.tasks}
    shared = [t for t in model.tasks.tasks if t.name in new_by_name and comparable(t, new_by_name[t.name]) is None]
    mapped: dict[str, np.ndarray] = {}
    thresholds: dict[str, list[float]] = {}
    for cur in shared:
        new = new_by_name[cur.name]
        own = card.label_thresholds(cur) if cur.labels else None  # tuned per label (multilabel); others ignore it
        mapped[cur.name], th = remap(cur, new, scores[cur.name], own)
        if th is not None:
            thresholds[cur.name] = th
    ev = Evaluation(
        loss=float("nan"), task_loss={}, scores=mapped, targets={t.name: data.targets[t.name][idx] for t in shared}
    )
    return ev.metrics([new_by_name[t.name] for t in shared], thresholds)


# --------------------------------------------------------------------------------------------- the gate
def load_current(promote_to: str, storage_options: dict[str, Any] | None) -> tuple[MultiHeadModel, ModelCard] | None:
    """The model at ``promote_to``, or None when there is none yet (no card: a first promotion interrupted before
    its card counts as none). A card there that does not load stops the gate: it cannot judge, and must not
    overwrite what it cannot read."""
    if not filesystem(promote_to, storage_options).exists(strip(join(promote_to, CARD_FILE))):
        return None
    try:
        return load_artifact(promote_to)
    except ArtifactError as err:
        raise UserError(
            f"promotion gate: the current model at {redact(promote_to)} does not load ({err}); put a good artifact "
            f"there ({WEIGHTS_FILE} and {CARD_FILE} of one version), or remove its {CARD_FILE} to promote the next "
            "model as the first"
        ) from None


def promote(new_out: str, promote_to: str, record: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    """Copy the new artifact over the current one: weights, then the card (see the module docstring), then the
    record. Every file is written whole; a transient store error is retried."""
    for name in (WEIGHTS_FILE, CARD_FILE):
        src = join(new_out, name)
        data = retry_transient(partial(read_bytes, src, storage_options), f"read {redact(src)}")
        write_bytes_atomic(join(promote_to, name), data, storage_options)
    write_bytes_atomic(join(promote_to, PROMOTION_FILE), json.dumps(record, indent=2).encode(), storage_options)
    landed = load_card(promote_to).version
    if landed != record["to_version"]:  # another writer promoted at the same time
        raise UserError(
            f"promotion: {redact(promote_to)} holds version {landed} after promoting {record['to_version']}"
        )


@dataclass(frozen=True)
class GateInput:
    """What the gate needs from the training run that just saved its artifact."""

    new_out: str  # the new artifact's folder
    card: ModelCard  # its saved card (version, tasks, test metrics)
    data: TrainData  # the decoded cache of the run
    test: np.ndarray  # the run's test rows (indices into ``data``)
    device: torch.device
    amp: bool


def gate(run: GateInput, promote_to: str, tolerance: float, storage_options: dict[str, Any] | None = None) -> Gate:
    """Compare the new model with the one at ``promote_to`` on the run's test split and promote it when no task is
    worse by more than ``tolerance``; the decision (``Gate``) either way. Nothing at ``promote_to`` changes on a
    refusal."""
    result = Gate(promote_to, tolerance, run.card.version, None, test_images=int(run.test.size))
    current = load_current(promote_to, storage_options)
    if current is not None:
        model, card = current
        result.current_version = card.version
        if card.version == run.card.version:
            log.info("promotion gate: %s already holds version %s", redact(promote_to), card.version)
        new_tasks = run.card.task_config()
        if run.test.size == 0:
            raise UserError(
                "promotion gate: the run has no test images to compare the models on; set test_fraction > 0"
            )
        model.to(run.device)
        cur_metrics = current_metrics(model, card, new_tasks, run.data, run.test, run.device, amp=run.amp)
        result.tasks = judge(new_tasks.tasks, run.card.metrics, card.task_config().tasks, cur_metrics, tolerance)
    for t in result.tasks:
        log.info(
            "promotion gate: %s %s current %s, new %s: %s", t.task, t.metric or "-", format_metric(t.current),
            format_metric(t.new), t.verdict,
        )  # fmt: skip
    if result.accepted:
        record = {
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_version": result.current_version,
            "to_version": result.new_version,
            "source": redact(run.new_out),
            "tolerance": tolerance,
            "test_images": result.test_images,
            "tasks": result.to_dict()["tasks"],
        }
        promote(run.new_out, promote_to, record, storage_options)
        result.promoted = True
        log.info("%s", result.message())
    else:
        log.warning("%s", result.message())
    return result


def comparison_rows(promotion: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows for a table of ``Gate.to_dict()``: task, metric, current, new, change, verdict."""
    return [
        (
            t["task"],
            t["metric"] or "-",
            format_metric(t["current"]),
            format_metric(t["new"]),
            "-" if t["change"] is None else f"{t['change']:+.3f}",
            t["verdict"] + (f" ({t['note']})" if t["note"] else ""),
        )
        for t in promotion["tasks"]
    ]


def check_current(cfg: TrainConfig) -> None:
    """Before any image is read: what would stop the gate after training stops it now."""
    if not cfg.promote_to:
        return
    if cfg.test_fraction == 0:
        raise UserError("promote_to needs a test split to compare the models on: set test_fraction > 0")
    load_current(cfg.promote_to, cfg.storage_options)


def promotion_gate(
    cfg: TrainConfig, card: ModelCard, data: TrainData, test: np.ndarray, device: torch.device
) -> dict[str, Any] | None:
    """The training pipeline's step: ``gate`` when ``cfg.promote_to`` is set, its decision as JSON; else None."""
    if not cfg.promote_to:
        return None
    run = GateInput(new_out=cfg.out, card=card, data=data, test=test, device=device, amp=cfg.amp)
    return gate(run, cfg.promote_to, cfg.promotion_tolerance, cfg.storage_options).to_dict()
