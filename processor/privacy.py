"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) and its accounting.

Each client clips its delta to the plan's L2 norm C and adds Gaussian noise. The privacy unit is
a client: adding or removing one changes a round's sum of clipped deltas by at most C, and the
Gaussian noise of std z * C on that sum makes each round a Gaussian mechanism of multiplier z.
Rounds compose: `dp-accounting`'s RDP accountant adds up their Renyi divergences and turns the
total into (epsilon, delta).

No amplification by subsampling is claimed: which clients a round invites is drawn from a seed
that is public on chain, so it is no secret from an observer, and the invited set of each round is
known; each round counts as a full Gaussian mechanism for every client.

Pure functions over NumPy: no web, chain or TensorFlow code here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from processor.aggregate import clip_by_norm
from processor.weights import Weights, flatten, unflatten

MAX_JSON = 500  # characters of the plan in a base model's metadata
# How far past its expected norm a client's noise may plausibly reach: a Gaussian vector's norm is
# 1-Lipschitz in it, so P(||g|| > sqrt(d) + t) <= exp(-t^2 / 2), 2e-22 at t = 10 (section "Why
# an update's norm has a bound" in `max_update_norm`).
NOISE_NORM_MARGIN = 10.0
FLOAT16_ROUNDING = 2.0 ** -11  # the largest relative rounding error of a value stored as float16


@dataclass(frozen=True)
class PrivacyPlan:
    """How every client of a round privatizes its delta; carried in each base model's metadata."""
    clip_norm: float = 0.0  # L2 bound of each client's delta; 0 = no clipping
    noise_multiplier: float = 0.0  # z: the noise on a round's sum of deltas has std z * clip_norm; 0 = no DP
    delta: float = 1e-5  # the delta that epsilon is stated at
    epsilon_budget: float = 0.0  # the training ends before a round would spend more; 0 = no budget
    secure_aggregation: bool = False  # the organization sees only the sum of a round's updates
    threshold: int = 0  # the fewest clients whose updates a secure round's sum has: >= 2 when secure, else 0
    secure_groups: int = 3  # a secure round's clients form up to this many groups, each summed on its own
    exclusion_rounds: int = 5  # rounds a client that made a secure round's group fail is left off its rosters

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"the privacy plan's {name} must be a finite number >= 0, got {value!r}")
        if self.noise_multiplier > 0 and self.clip_norm == 0:
            raise ValueError("the privacy plan adds noise (noise_multiplier > 0) without a clip norm: "
                             "the noise must be scaled to a bounded delta")
        if not 0 < self.delta < 1:
            raise ValueError(f"the privacy plan's delta must lie in (0, 1), got {self.delta!r}")
        if self.epsilon_budget > 0 and self.noise_multiplier == 0:
            raise ValueError("the privacy plan has an epsilon budget but adds no noise (noise_multiplier 0)")
        if self.secure_aggregation != (self.threshold >= 2) or self.threshold < 0:
            raise ValueError(f"the privacy plan's threshold must be >= 2 with secure aggregation and 0 without, "
                             f"got {self.threshold} with secure_aggregation {self.secure_aggregation}")
        if self.secure_groups < 1 or self.exclusion_rounds < 0:
            raise ValueError(f"the privacy plan's secure_groups must be >= 1 and exclusion_rounds >= 0, got "
                             f"{self.secure_groups} and {self.exclusion_rounds}")
        if self.secure_aggregation and self.clip_norm == 0:
            raise ValueError("secure aggregation needs a clip norm: it bounds the values each client adds to the sum")

    @property
    def is_dp(self) -> bool:
        """Whether the rounds are differentially private (they add noise)."""
        return self.noise_multiplier > 0

    @property
    def is_private(self) -> bool:
        """Whether each update is protected (by noise or masks): then nothing else a client computed
        from its data (its metrics, its Fisher) may go out beside it, uncovered."""
        return self.is_dp or self.secure_aggregation

    def refuse_regularizer(self, regularizer: str) -> None:
        """ValueError for a penalty this plan's rounds cannot take: FedCurv, whose clients publish
        their Fisher in the clear beside their update, in a private round."""
        if regularizer == "fedcurv" and self.is_private:
            raise ValueError("FedCurv cannot run in a private round: each client would publish the Fisher of its "
                             "own data in the clear beside its protected update; choose ewc or fedprox")

    def reported_samples(self, num_samples: int) -> int:
        """The sample count a client reports on chain and in its update's header: its own, or 1 in a
        private round, where counts are no weights (a weight above 1 would multiply a client's
        influence past the clip) and would tell how much data its user has. A secure round's real
        counts are summed under the masks (processor.secure_sum): only a group's total is read."""
        return 1 if self.is_private else num_samples

    @property
    def publishes_evaluation(self) -> bool:
        """Whether a client's update carries its metrics of the base on its own held-out data: not
        in a private round, where neither the noise nor the masks would cover them."""
        return not self.is_private

    # ---- flags and JSON, as TrainingSettings has them --------------------------------------

    # field: (flag, type, help); each parsed into "privacy_" + field, apart from the flags of other
    # settings with a like name (run.py app's --clip-norm bounds the merge, not a client's delta)
    FLAGS = {
        "clip_norm": ("--dp-clip-norm", float, "DP: each client clips its delta to this L2 norm (0: no clipping)"),
        "noise_multiplier": ("--noise-multiplier", float, "DP: the Gaussian noise on a round's sum of deltas has std "
                                                          "this x the clip norm (0: no DP)"),
        "delta": ("--dp-delta", float, "DP: the delta epsilon is stated at"),
        "epsilon_budget": ("--epsilon-budget", float, "DP: end the training before a round would spend more than "
                                                      "this epsilon (0: no budget)"),
        "secure_aggregation": ("--secure-aggregation", bool, "the organization sees only the sum of each round's "
                                                             "updates, each masked by pairwise masks (needs "
                                                             "--dp-clip-norm and --threshold)"),
        "threshold": ("--threshold", int, "secure aggregation: the fewest clients a round's sum may have; a round "
                                          "survives all but this many dropping out (the quorum must be at least it)"),
        "secure_groups": ("--secure-groups", int, "secure aggregation: split each round's clients into up to this "
                                                  "many groups of at least the threshold, each summed on its own, "
                                                  "and merge the groups' means by their median (3 or more groups), "
                                                  "so that one hostile client moves only its own group's"),
        "exclusion_rounds": ("--exclusion-rounds", int, "secure aggregation: leave a client whose keys, shares or "
                                                        "vector made its group fail off this many next rounds"),
    }

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, preset: str | None = None) -> None:
        """--dp-clip-norm, --noise-multiplier, --dp-delta and --epsilon-budget, defaulting to no
        privacy; with `preset` (what a preset flag sets, in words), a flag not given is None and
        `from_args` takes the preset's value for it."""
        default = cls()
        for name, (flag, kind, text) in cls.FLAGS.items():
            how = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
            if preset:
                parser.add_argument(flag, dest=f"privacy_{name}", default=None,
                                    help=f"{text} (default: {getattr(default, name)}, or {preset})", **how)
            else:
                parser.add_argument(flag, dest=f"privacy_{name}", default=getattr(default, name),
                                    help=f"{text} (default: %(default)s)", **how)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: "PrivacyPlan | None" = None) -> "PrivacyPlan":
        """The flags' plan; a flag left None takes `base`'s value (a preset's). ValueError for a plan
        that does not hold together."""
        given = {name: getattr(args, f"privacy_{name}", None) for name in cls.FLAGS}
        values = {name: value for name, value in given.items() if value is not None}
        return replace(base or cls(), **values)

    def as_flags(self) -> list[str]:
        """This plan as the flags `add_flags` defines, for starting another process."""
        flags = []
        for name, (flag, kind, _) in self.FLAGS.items():
            value = getattr(self, name)
            if kind is bool:
                flags.append(flag if value else flag.replace("--", "--no-", 1))
            else:
                flags += [flag, str(value)]
        return flags

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyPlan":
        """A plan from a base model's metadata, checked field by field; ValueError says what is wrong."""
        try:
            values = json.loads(text) if isinstance(text, str) and len(text) < MAX_JSON else None
        except ValueError:
            values = None
        if not isinstance(values, dict):
            raise ValueError(f"the privacy plan is not a JSON object of fewer than {MAX_JSON} characters")
        kinds = {f.name: {"float": float, "int": int, "bool": bool}[f.type] for f in fields(cls)}
        if set(values) != set(kinds):
            raise ValueError(f"the privacy plan has the fields {sorted(values)}, expected {sorted(kinds)}")
        for name, kind in kinds.items():
            value = values[name]
            accepted = (int, float) if kind is float else (kind,)
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
                raise ValueError(f"the privacy plan's {name} is {value!r}, not a {kind.__name__}")
        return cls(**{name: float(value) if kinds[name] is float else value for name, value in values.items()})

    def describe(self) -> str:
        """What a client does to its delta under this plan, in words."""
        if self.clip_norm == 0:
            return "published as trained (no differential privacy)"
        masked = (f", then masked: only the sum of at least {self.threshold} clients' updates can be read"
                  if self.secure_aggregation else "")
        noise = client_noise_std(self)
        if not noise:
            return f"clipped to L2 norm {self.clip_norm:g}, no noise{masked}"
        share = (f" (its share of the noise of std {self.noise_multiplier * self.clip_norm:.3g} on the sum of "
                 f"at least {self.threshold})") if self.secure_aggregation else ""
        return (f"clipped to L2 norm {self.clip_norm:g}, plus Gaussian noise of std {noise:.3g} per "
                f"coordinate{share}{masked}")


# ---- the mechanism ------------------------------------------------------------------------


def clip(delta: Weights, clip_norm: float) -> Weights:
    """`delta` scaled down to L2 norm `clip_norm` when longer; 0 = unchanged (no clipping)."""
    return clip_by_norm(delta, clip_norm) if clip_norm > 0 else delta


def gaussian(size: int, std: float) -> np.ndarray:
    """`size` independent N(0, std^2) values as float32, from the operating system's CSPRNG.

    The uniforms come from os.urandom (the kernel's ChaCha20 generator), 53 bits each, and Box-Muller
    turns each pair into two Gaussians. NumPy's own generators are not cryptographically secure:
    PCG64's state follows from its outputs, so noise drawn from it could be predicted and
    subtracted by whoever learns the state, even when seeded with a fresh secret. Box-Muller over
    doubles is exact up to floating-point rounding; like every floating-point sampler it does not
    close the least-significant-bit channel Mironov (2012) describes for Laplace noise, which the
    float32 (or float16) rounding of the published delta blurs further.
    """
    pairs = (size + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    radius = np.sqrt(-2.0 * np.log(((bits[0] >> np.uint64(11)) + 0.5) * 2.0 ** -53))  # uniform in (0, 1): no log(0)
    angle = (bits[1] >> np.uint64(11)) * (2.0 * math.pi * 2.0 ** -53)
    values = np.empty(2 * pairs, np.float32)
    np.multiply(radius, np.cos(angle), out=values[:pairs], casting="same_kind")
    np.multiply(radius, np.sin(angle), out=values[pairs:], casting="same_kind")
    values *= np.float32(std)
    return values[:size]


def client_noise_std(plan: PrivacyPlan) -> float:
    """The std of the Gaussian noise each client adds to each coordinate of its clipped delta.

    Without secure aggregation every delta is public, so each carries the plan's whole noise z * C
    itself (local DP). With it the organization sees only the sum of at least `threshold` deltas,
    so each client adds z * C / sqrt(threshold) and their sum carries the plan's noise (distributed DP).
    """
    full = plan.noise_multiplier * plan.clip_norm
    return full / math.sqrt(plan.threshold) if plan.secure_aggregation else full


def privatize(delta: Weights, plan: PrivacyPlan) -> Weights:
    """A client's delta as it may leave the device: clipped to the plan's norm, with its noise, as float32."""
    clipped = clip(delta, plan.clip_norm)
    std = client_noise_std(plan)
    if std == 0:
        return {name: np.asarray(t, np.float32) for name, t in clipped.items()}
    return with_noise(clipped, std)


def with_noise(tensors: Weights, std: float) -> Weights:
    """`tensors` as float32, plus Gaussian noise of `std` on every value (one draw for them all)."""
    flat = flatten(tensors).astype(np.float32)
    return unflatten(flat + gaussian(flat.size, std), tensors)


def max_update_norm(plan: PrivacyPlan, dimension: int) -> float:
    """The largest L2 norm a delta of `dimension` values privatized by `plan` plausibly has, as
    stored in float16 or float32; infinite when the plan does not clip.

    Why an update's norm has a bound: ||clip(d) + g|| <= C + ||g||, and g, the client's noise of std
    s per coordinate, has ||g|| / s <= sqrt(dimension) + t except with probability exp(-t^2 / 2)
    (Gaussian concentration of a 1-Lipschitz function, E||g|| <= s sqrt(dimension)). At t = 10 an
    honest update lies beyond the bound once in 10^21; storing it as float16 stretches it by at most
    2^-11. An update longer than this was not clipped, or carries more than its noise.
    """
    if plan.clip_norm == 0:
        return math.inf
    noise = client_noise_std(plan) * (math.sqrt(dimension) + NOISE_NORM_MARGIN)
    return (plan.clip_norm + noise) * (1 + FLOAT16_ROUNDING)


# ---- accounting ---------------------------------------------------------------------------


def _accountant(rounds: int, noise_multiplier: float):
    """dp-accounting's RDP accountant after `rounds` Gaussian mechanisms of multiplier `noise_multiplier`."""
    from dp_accounting import dp_event  # imported where used: the command line loads this module too
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), rounds)
    return accountant


def epsilon_spent(rounds: int, plan: PrivacyPlan) -> float:
    """Epsilon at the plan's delta after `rounds` rounds (every round whose updates were published,
    restarted ones too); infinite for any round without noise."""
    if rounds <= 0:
        return 0.0
    if not plan.is_dp:
        return math.inf
    return float(_accountant(rounds, plan.noise_multiplier).get_epsilon(plan.delta))


def rounds_within_budget(plan: PrivacyPlan) -> int | None:
    """The most rounds whose epsilon stays within the plan's budget; None without a budget."""
    if plan.epsilon_budget == 0:
        return None
    low, high = 0, 1  # epsilon grows with the rounds: double, then bisect
    while epsilon_spent(high, plan) <= plan.epsilon_budget:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if epsilon_spent(middle, plan) <= plan.epsilon_budget else (low, middle)
    return low


def noise_multiplier_for(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose `rounds` rounds spend at most `epsilon` at `delta`
    (dp-accounting's calibration: Brent's method over the accountant)."""
    import dp_accounting
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    return float(dp_accounting.calibrate_dp_mechanism(
        rdp_privacy_accountant.RdpAccountant,
        lambda z: dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds),
        epsilon, delta, dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))
