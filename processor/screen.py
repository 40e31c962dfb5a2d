"""The organization's check-and-merge of one round: a verdict for every update, and the merge of
those accepted. Pure functions over bytes already fetched; no chain or IPFS code here.

Nothing one update holds can fail the round: whatever goes wrong while checking it becomes its
verdict (`Rejected` for what the checks refuse; any other exception is a defect of the checks, and
the caller logs it, but it still ends as that update's verdict).

One client's influence on the merged model is bounded by the round's own updates, not by constants
an attacker can fill up to: its FedAvg weight is capped at `weight_multiple` times the median
sample count, its delta is scaled down to `clip_multiple` times the median delta norm, and a delta
longer than `reject_multiple` times that median is refused as anomalous, and so is one that points
away from the coordinate-wise median of the round's deltas (a robust consensus while most clients
are honest): a sign-flipped update is refused outright, not only shortened. The weights that remain
are scaled by each delta's cosine with that median (as FLTrust scales by the cosine with a trusted
update), so a delta that only grazes the consensus, mostly pushing elsewhere, counts for little.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from processor import aggregate as agg
from processor import codec, penalty, rounds
from processor.evaluation import Evaluation
from processor.penalty import RoundCurvature, SentStatistics
from processor.privacy import PrivacyPlan, max_update_norm
from processor.tasks import Task
from processor.weights import Weights

log = logging.getLogger("processor.screen")


class Rejected(Exception):
    """An update refused by the checks; the message is its verdict's reason."""


@dataclass(frozen=True)
class MergePolicy:
    aggregation: str = "fedavg"  # fedavg, median or trimmed_mean
    weight_multiple: float | None = 1.0  # FedAvg weight <= this x the round's median sample count
    clip_multiple: float | None = 1.0  # each delta scaled down to this x the round's median norm
    reject_multiple: float | None = 10.0  # a delta longer than this x the median norm is refused
    min_cosine: float | None = 0.0  # a delta pointing away from the coordinate-wise median is refused
    cosine_weighting: bool = True  # FedAvg weights scaled by each delta's cosine with that median
    clip_norm: float | None = None  # also scale every delta down to this absolute L2 norm
    max_norm: float = 1e6  # an absolute bound, far above any honest delta: refused beyond it

    def __post_init__(self) -> None:
        if self.aggregation not in agg.AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; "
                             f"choose one of {', '.join(agg.AGGREGATIONS)}")
        for name in ("weight_multiple", "clip_multiple", "reject_multiple", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")


BOUNDS = ("median", "none")  # how one client's influence is bounded: by the round's medians, or not at all


def policy_for(bounds: str = "median", **settings) -> MergePolicy:
    """The policy with the round's median bounds (the default), or with none of them: plain FedAvg
    as Flower's, for like-for-like comparisons."""
    if bounds not in BOUNDS:
        raise ValueError(f"unknown bounds {bounds!r}; choose one of {', '.join(BOUNDS)}")
    if bounds == "none":
        settings = {"weight_multiple": None, "clip_multiple": None, "reject_multiple": None, "min_cosine": None,
                    "cosine_weighting": False, **settings}
    return MergePolicy(**settings)


@dataclass(frozen=True)
class Received:
    """One submission as the chain records it, with what fetching its CID gave: the bytes, or why not."""
    client: str
    num_samples: int
    data: bytes | None = None
    fetch_error: str | None = None


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None
    norm: float | None = None  # the delta's L2 norm as received
    weight: int | None = None  # its FedAvg weight after the cap
    evaluation: Evaluation | None = None  # what the client reported of the base on its held-out data

    def as_dict(self) -> dict:
        return {"accepted": self.accepted, "reason": self.reason, "norm": self.norm, "weight": self.weight,
                "evaluation": asdict(self.evaluation) if self.evaluation else None}


@dataclass
class RoundMerge:
    """The merged model (None when no update was accepted) and a verdict per client; in a FedCurv
    round, the statistics of the merged updates (None when none was merged)."""
    weights: Weights | None
    verdicts: dict[str, Verdict]
    curvature: RoundCurvature | None = None

    @property
    def accepted(self) -> int:
        return sum(v.accepted for v in self.verdicts.values())

    def evaluations(self) -> list[Evaluation]:
        """The base's federated evaluation: the reports of the clients whose updates were accepted."""
        return [v.evaluation for v in self.verdicts.values() if v.accepted and v.evaluation is not None]


def compared(value: float, bound: float) -> tuple[str, str]:
    """`value` and `bound` written with as many significant digits as it takes to tell them apart."""
    for digits in range(4, 18):
        shown = f"{value:.{digits}g}", f"{bound:.{digits}g}"
        if shown[0] != shown[1] or value == bound:
            return shown
    return repr(value), repr(bound)


@dataclass(frozen=True)
class Checked:
    """An update that passed every check needing no other update."""
    update: Received
    delta: Weights
    norm: float  # the delta's L2 norm
    evaluation: Evaluation | None  # the client's report of the base on its held-out data
    fisher: Weights | None  # the base's Fisher on its data (FedCurv rounds)


def check_update(task: Task, update: Received, round_id: int, base_cid: str, max_norm: float,
                 with_fisher: bool = False) -> Checked:
    """`update` after every check that needs no other update. A report that does not fit is
    dropped, not the update. `with_fisher`: a FedCurv round's update must carry its Fisher.

    Raises Rejected with the reason."""
    if update.data is None:
        raise Rejected(update.fetch_error or "the update could not be fetched")
    try:
        delta, meta, fisher = codec.decode_delta(task, update.data, expected_round=round_id,
                                                 expected_base_cid=base_cid, with_fisher=with_fisher)
    except codec.CodecError as exc:
        raise Rejected(str(exc)) from None
    if meta["client"].lower() != update.client.lower():
        raise Rejected(f"the update names client {meta['client']!r}, but {update.client} submitted it")
    if int(meta["num_samples"]) != update.num_samples:
        raise Rejected(f"the update claims {meta['num_samples']} samples, the chain records {update.num_samples}")
    norm = agg.l2_norm(delta)  # infinite when finite values overflow float32's dot: refused below
    if not norm <= max_norm:
        shown, bound = compared(norm, max_norm)
        raise Rejected(f"the delta's L2 norm {shown} exceeds the bound {bound}")
    try:
        evaluation = codec.reported_evaluation(meta)
    except codec.CodecError as exc:
        log.warning("round %d: ignored the evaluation report of %s: %s", round_id, update.client, exc)
        evaluation = None
    return Checked(update, delta, norm, evaluation, fisher)


def capped_weights(sample_counts: Sequence[int], multiple: float | None) -> list[int]:
    """Each sample count, capped at `multiple` times their median (at least 1): no client's claim of
    more data buys it more than that share of the average."""
    if multiple is None or not sample_counts:
        return list(sample_counts)
    cap = max(1, math.floor(multiple * float(np.median(sample_counts))))
    return [min(n, cap) for n in sample_counts]


def merge_round(task: Task, base_weights: Weights, updates: Sequence[Received], round_id: int, base_cid: str,
                policy: MergePolicy = MergePolicy(), privacy: PrivacyPlan = PrivacyPlan(),
                with_curvature: bool = False) -> RoundMerge:
    """Check every update, bound each one's influence by the round's medians, and merge the rest.

    In a DP round (`privacy` adds noise) every delta is mostly its noise, so the round's medians and
    cosines would judge the noise: each client's influence is bounded by its clip norm instead,
    an update longer than a clipped delta with its noise can plausibly be is refused
    (`privacy.max_update_norm`), and the rest merge by their plain mean, whatever `policy` says.

    `with_curvature` (FedCurv rounds, never DP ones): every update must carry its Fisher, and the
    merge sums the merged updates' statistics, each delta as it was merged (clipped or not)."""
    verdicts: dict[str, Verdict] = {}
    checked: list[Checked] = []
    max_norm = min(policy.max_norm, max_update_norm(privacy, sum(math.prod(s) for s in task.spec.values())))
    for update in updates:
        try:
            checked.append(check_update(task, update, round_id, base_cid, max_norm, with_curvature))
        except Rejected as exc:
            verdicts[update.client] = Verdict(False, str(exc))
        except Exception as exc:  # a defect of the checks: still this update's verdict, never the round's failure
            log.exception("round %d: checking the update of %s failed unexpectedly", round_id, update.client)
            verdicts[update.client] = Verdict(False, f"the update could not be checked ({type(exc).__name__}: {exc})")

    if privacy.is_dp:
        return _plain_mean(base_weights, checked, verdicts)
    if checked and policy.reject_multiple is not None:
        median = float(np.median([c.norm for c in checked]))
        bound = policy.reject_multiple * median
        kept = []
        for c in checked:
            if c.norm > bound:
                shown, limit = compared(c.norm, bound)
                reason = (f"the delta's L2 norm {shown} exceeds {policy.reject_multiple:g} times the round's "
                          f"median ({limit})")
                verdicts[c.update.client] = Verdict(False, reason, norm=c.norm)
            else:
                kept.append(c)
        checked = kept

    cosines: dict[str, float] = {}
    if len(checked) > 2 and (policy.min_cosine is not None or policy.cosine_weighting):
        consensus = agg.coordinate_median([c.delta for c in checked])
        kept = []
        for c in checked:
            cosine = cosines[c.update.client] = agg.cosine(c.delta, consensus)
            if policy.min_cosine is not None and cosine < policy.min_cosine:
                verdicts[c.update.client] = Verdict(
                    False, f"the delta points away from the round's consensus (cosine {cosine:.3f} with the "
                           f"coordinate-wise median of the updates, below {policy.min_cosine:g})", norm=c.norm)
            else:
                kept.append(c)
        checked = kept

    if not checked:
        return RoundMerge(None, verdicts)
    clip = None
    if policy.clip_multiple is not None:
        clip = policy.clip_multiple * float(np.median([c.norm for c in checked]))
    if policy.clip_norm is not None:
        clip = policy.clip_norm if clip is None else min(clip, policy.clip_norm)
    weights = capped_weights([c.update.num_samples for c in checked], policy.weight_multiple)
    if policy.cosine_weighting and cosines:
        weights = [max(1, round(w * max(0.0, cosines[c.update.client]))) for c, w in zip(checked, weights)]
    for c, weight in zip(checked, weights):
        verdicts[c.update.client] = Verdict(True, None, norm=c.norm, weight=weight, evaluation=c.evaluation)

    deltas = [(c.delta, weight) for c, weight in zip(checked, weights)]
    curvature = penalty.round_curvature(round_id, (
        (c.update.client, SentStatistics(round_id, base_weights, c.delta, c.fisher),
         agg.clip_factor(c.norm, clip))
        for c in checked)) if with_curvature else None
    return RoundMerge(rounds.aggregate(base_weights, deltas, method=policy.aggregation, clip_norm=clip), verdicts,
                      curvature)


def _plain_mean(base_weights: Weights, checked: list[Checked], verdicts: dict[str, Verdict]) -> RoundMerge:
    """A DP round's merge: the plain mean of its checked deltas (sample counts are on chain, but
    a weight above 1 would multiply a client's influence past the clip norm)."""
    for c in checked:
        verdicts[c.update.client] = Verdict(True, None, norm=c.norm, weight=1, evaluation=c.evaluation)
    if not checked:
        return RoundMerge(None, verdicts)
    deltas = agg.unit_weights((c.delta, c.update.num_samples) for c in checked)
    return RoundMerge(rounds.aggregate(base_weights, deltas), verdicts)
