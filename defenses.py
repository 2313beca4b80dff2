"""Test-time defences that evaluate.py wraps a zero-shot CLIP classifier in, and the views of each that an attacker
differentiates (docs/defenses.md). The training scripts never import this file.

A defence turns images into logits: predict(x, index, draw) -> (B, C), where index (B,) holds each image's dataset
index and `draw` numbers the defender's random draws, so every random choice comes from a generator seeded by
(seed, image index, draw) and a result does not depend on batching or the number of processes. An attacker sees a
defence through a view, a logits_fn(x) -> (B, C) that the attacks of attacks.py differentiate: each defence says
which views its authors' attack and an adaptive attacker use (Athalye et al. 2018; Tramèr et al. 2020; Croce et al.
2022). The threat model: the attacker knows the weights, the defence and its hyperparameters, not the defender's
draws (except in the known-noise diagnostic).

Sections, in the order they build on each other (search for the `# ---- name` rule):
    classifier     Zeroshot (100 · s(f(x), T) and the pieces a defence needs), Rows (which image a row of an
                   attack's batch is: attacks shrink and reorder their batches)
    TTC            Xing, Zhao, Sebe, "CLIP is Strong Enough to Fight Back" (CVPR 2025, arXiv 2503.03613):
                   ttc_weights, ttc_start, ttc_tau, ttc_counterattack, TTC (predict, views: bpda-eot, known-noise,
                   the τ-gate attack)
    CLIPure-Cos    Zhang et al., "CLIPure" (ICLR 2025, arXiv 2502.18176): clipure_cos (per image, or the official
                   batch form; exact or the authors' gradient), CLIPure (predict, views: authors, exact,
                   bpda-identity)
    registry       DEFENSES, build_defense, the attack modes
"""
import torch
import torch.nn.functional as F

import common

# ---------------------------------------------------------------------------------------------------- classifier
class Zeroshot:
    """The zero-shot classifier a defence wraps: encoder f (images in [0, 1] -> (B, D)), class text features T (C, D),
    logits 100 · s(f(x), T); `reference` the original CLIP's image encoder (TTC's τ on a fine-tuned model) or None;
    `null_text` (D,) the text embedding of the prompt template without a class name (CLIPure) or None."""

    def __init__(self, encoder, text, reference=None, null_text=None):
        self.encoder, self.text, self.reference, self.null_text = encoder, text, reference, null_text

    def logits(self, x):
        return common.CLIP_LOGIT_SCALE * common.cosine_sim(self.encoder(x), self.text)

    def logits_of_embedding(self, u):  # u (B, D) unit vectors -> (B, C)
        return common.CLIP_LOGIT_SCALE * u @ F.normalize(self.text.float(), dim=-1).t()


class Rows:
    """Which image each row of an attack's batch is. The attacks call a view on subsets of the batch they were given
    (APGD's early exit, the survivors of a combined attack), in any order, and a view's random draws must follow the
    image, not the row: a row x' belongs to the clean image x_i it is within the ε-ball of, found as the nearest
    clean image in ℓ∞ (any two images of a dataset differ by more than 2ε, except exact duplicates, which then
    share draws). Each image also counts the calls it has been in, so that a view can draw afresh at every call,
    deterministically per image."""

    def __init__(self, x, index):
        self.x, self.index = x.detach(), index.cpu()
        self.calls = {}

    def of(self, x):
        """(B',) dataset indices of the rows of x (B', 3, H, W), and (B',) each one's call number (0, 1, ...)."""
        with torch.no_grad():
            flat = x.detach().flatten(1)  # (B', P); one clean image at a time: (B', B, P) would not fit in memory
            dist = torch.stack([(flat - c).abs().amax(1) for c in self.x.flatten(1)], dim=1)  # (B', B)
        index = self.index[dist.argmin(1).cpu()]
        calls = []
        for i in index.tolist():
            calls.append(self.calls.get(i, 0))
            self.calls[i] = calls[-1] + 1
        return index, torch.tensor(calls, dtype=torch.long)


# Streams of the defences' random draws (common.sample_generator), apart from the attacks' (common.STREAMS): the
# defender's draw r uses stream DEFENDER + r, an attacker's draw k at its c-th call ATTACKER + k · 65 536 + c.
DEFENDER, ATTACKER = 1 << 20, 1 << 24


def uniform_draws(index, shape, eps, seed, streams, device):
    """U(−ε, ε)^shape for each row from generator (seed, index[j], streams[j]). index, streams: (B,) -> (B, *shape)."""
    out = torch.empty((len(index), *shape))
    for j, (i, s) in enumerate(zip(index.tolist(), streams.tolist())):
        out[j] = (torch.rand(shape, generator=common.sample_generator(seed, i, s)) * 2 - 1) * eps
    return out.to(device)


# ----------------------------------------------------------------------------------------------------------- TTC
TTC_DEFAULTS = {"eps": 4.0, "step": 1.0, "steps": 2, "tau": 0.2, "beta": 2.0}  # ε_c, α_c in 1/255; the official code
TTC_HELP = {"eps": "counterattack budget ε_c in units of 1/255", "step": "counterattack step α_c in units of 1/255",
            "steps": "counterattack steps N", "tau": "threshold τ_th on τ = ‖f(x + δ₀) − f(x)‖ / ‖f(x)‖",
            "beta": "weight exponent β (w_k ∝ e^{βk})"}


def ttc_weights(steps, beta):
    """The counterattack's weights over its N + 1 iterates δ_0, ..., δ_N: w_k = e^{βk} / Σ_j e^{βj}
    (N = 2, β = 2: 0.016, 0.117, 0.867). -> (N + 1,)"""
    return torch.softmax(beta * torch.arange(steps + 1, dtype=torch.float64), 0).float()


def ttc_start(x, index, eps, seed, streams):
    """δ₀ ~ U(−ε_c, ε_c) per pixel, cut so that x + δ₀ stays in [0, 1] (as the official code clamps it).
    -> (B, 3, H, W)"""
    x = x.detach()
    delta = uniform_draws(index, x.shape[1:], eps, seed, streams, x.device)
    return torch.max(torch.min(delta, 1 - x), -x)


def ttc_tau(encoder, x, delta0, f_x=None, f_noisy=None):
    """τ = ‖f(x + δ₀) − f(x)‖ / ‖f(x)‖ per image, on the raw (unnormalised) embeddings; f_x = f(x) and
    f_noisy = f(x + δ₀) when already computed, (B, D). -> (B,)"""
    f_x = encoder(x).float() if f_x is None else f_x
    f_noisy = encoder(x + delta0).float() if f_noisy is None else f_noisy
    return (f_noisy - f_x).norm(dim=-1) / f_x.norm(dim=-1)


def ttc_counterattack(encoder, x, delta0, eps, step, steps, f_x):
    """The counterattack's iterates: δ_{k+1} = Π(δ_k + α_c · sign ∇_δ ‖f(x + δ) − f(x)‖²), Π onto the ε_c-ball and
    x + δ ∈ [0, 1], from δ₀, f_x = f(x) (B, D); pushes the embedding away from f(x).
    -> (B, N + 1, 3, H, W): δ_0, ..., δ_N, and f(x + δ₀) (B, D) from the first step's forward (None if N = 0)."""
    def loss(z):
        f = encoder(z).float()
        return ((f - f_x) ** 2).sum(), f.detach()
    deltas, delta, f_start = [delta0], delta0, None
    for k in range(steps):
        with torch.enable_grad():  # also when the defended model is queried under no_grad
            grad, f = common.input_grad(loss, x + delta, has_aux=True)  # ∇_δ = ∇_z at z = x + δ
        f_start = f if k == 0 else f_start
        delta = (delta + step * grad.sign()).clamp(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)
        deltas.append(delta)
    return torch.stack(deltas, dim=1), f_start


class TTC:
    """Test-time counterattacks: x ↦ CLIP(x + Δ), Δ = Σ_k w_k δ_k if τ < τ_th (the image's embedding hardly moves
    under noise: TTC's sign of an adversarial image), else Δ = δ₀ (noise only). τ uses the original CLIP when the
    model is fine-tuned (`zs.reference`), as the official code does. Randomised (δ₀). Settings in units of 1/255."""

    name, randomised = "ttc", True

    def __init__(self, zs, seed, eps=4.0, step=1.0, steps=2, tau=0.2, beta=2.0):
        self.zs, self.seed = zs, seed
        self.eps, self.step, self.steps, self.tau_th, self.beta = eps / 255, step / 255, steps, tau, beta
        self.tau_encoder = zs.encoder if zs.reference is None else zs.reference
        self.settings = {"eps": eps, "step": step, "steps": steps, "tau": tau, "beta": beta}

    def counter(self, x, delta0):
        """x + Δ (the image TTC classifies), τ (B,) and the gate (B,) bool: True = counterattack, False = noise only.
        No gradient reaches x through Δ."""
        x = x.detach()
        with torch.no_grad():
            f_x = self.zs.encoder(x).float()  # (B, D)
        deltas, f_start = ttc_counterattack(self.zs.encoder, x, delta0, self.eps, self.step, self.steps, f_x)
        with torch.no_grad():  # on the model itself, τ reuses f(x) and the first step's f(x + δ₀)
            tau = (ttc_tau(self.tau_encoder, x, delta0) if self.zs.reference is not None or f_start is None
                   else ttc_tau(None, x, delta0, f_x, f_start))
        gate = tau < self.tau_th
        w = ttc_weights(self.steps, self.beta).to(x.device).view(1, -1, 1, 1, 1)
        Delta = torch.where(gate.view(-1, 1, 1, 1), (w * deltas).sum(1), deltas[:, 0])
        return (x + Delta).clamp(0, 1), tau, gate

    def defender_start(self, x, index, draw):
        return ttc_start(x, index, self.eps, self.seed, torch.full((len(index),), DEFENDER + draw))

    def predict(self, x, index, draw):
        """The defended logits with the defender's draw `draw`. -> (B, C)"""
        x_def, _, _ = self.counter(x, self.defender_start(x, index, draw))
        with torch.no_grad():
            return self.zs.logits(x_def)

    def gate_stats(self, x, index, draw=0):
        """τ (B,) and the gate (B,) with the defender's draw."""
        _, tau, gate = self.counter(x, self.defender_start(x, index, draw))
        return tau, gate

    def bpda(self, x, starts):
        """CLIP(x + Δ) with Δ held constant (BPDA, Athalye et al. 2018): the gradient is CLIP's at x + Δ."""
        x_def, _, _ = self.counter(x, starts)
        return self.zs.logits(x + (x_def - x).detach())

    def view(self, mode, x, index, eot=8, draws=1):
        """logits_fn for the attacker in `mode`, for the images x (B, ...) with dataset indices `index`:
        bpda-eot    the mean over `eot` fresh draws of the attacker's own of CLIP(x + Δ), Δ held constant
        known-noise the same with the defender's draws 0, ..., draws − 1 (the attacker is told them)"""
        rows = Rows(x, index)

        def logits_fn(z):
            idx, calls = rows.of(z)
            if mode == "known-noise":
                streams = [torch.full((len(z),), DEFENDER + r) for r in range(draws)]
            else:
                streams = [ATTACKER + k * 65_536 + calls for k in range(eot)]
            return torch.stack([self.bpda(z, ttc_start(z, idx, self.eps, self.seed, s)) for s in streams]).mean(0)
        return logits_fn

    def gate_attack(self, x, y, index, eps, alpha, steps, seed, eot=8, margin=1.2, weight=100.0):
        """The adaptive attack on TTC's gate: PGD (common.pgd) on
            mean_k CE(CLIP(x + δ₀_k), y) − weight · mean_k max(margin · τ_th − τ_k(x), 0),
        δ₀_k the attacker's draws: x_adv should land where τ ≥ τ_th, in the noise-only branch, whose prediction
        CLIP(x + δ₀) it attacks with EOT over δ₀ (the gradient flows through τ and through CLIP(x + δ₀))."""
        rows = Rows(x, index)
        ref = self.tau_encoder

        def loss(z):
            idx, calls = rows.of(z)
            f_x, total = ref(z).float(), 0.0  # f(x), once for the `eot` draws
            for k in range(eot):
                d = ttc_start(z, idx, self.eps, self.seed, ATTACKER + k * 65_536 + calls)
                tau = ttc_tau(ref, z, d, f_x)
                ce = common.cross_entropy_per_sample(self.zs.logits(z + d), y)  # no cancellation at scale 100
                total = total + (ce - weight * (margin * self.tau_th - tau).clamp(min=0)).sum()
            return total / eot
        delta = common.per_sample_start(index, x.shape[1:], eps, seed, x.device)
        return common.pgd(loss, x, eps, alpha, steps, delta)


# --------------------------------------------------------------------------------------------------- CLIPure-Cos
CLIPURE_DEFAULTS = {"steps": 10, "step_size": 30.0}  # the official code's
CLIPURE_HELP = {"steps": "purification steps", "step_size": "purification step size"}


def clipure_cos(e, t, steps=10, step_size=30.0, group=1, create_graph=False):
    """CLIPure-Cos's purification in the embedding space: from u₀ = e/‖e‖ (B, D), `steps` times
        g = ∇_u cos(u, t)                       t (D,): the null-template text embedding
        u ← normalize(u + step_size · g / ‖g‖)  ‖g‖ per image (group=1), or over each `group` consecutive rows
                                                (the official code divides by the whole batch's gradient norm)
    create_graph=True keeps the second-order path (the exact gradient of u_N w.r.t. e); False detaches g, which is
    the gradient the official code's attack gets (torch.autograd.grad without create_graph). -> u_N (B, D)"""
    u = F.normalize(e.float(), dim=-1)
    t = F.normalize(t.float(), dim=-1)
    with torch.enable_grad():
        if not u.requires_grad:
            u = u.detach().requires_grad_(True)
        for _ in range(steps):
            cos = (u * t).sum(-1) / u.norm(dim=-1)  # (B,)
            g, = torch.autograd.grad(cos.sum(), u, create_graph=create_graph)  # (B, D)
            if group == 1:
                norm = g.norm(dim=-1, keepdim=True)
            else:  # the official batch form: one norm for each group of `group` rows
                sq = (g ** 2).sum(-1)  # (B,)
                per_group = torch.zeros((len(g) + group - 1) // group, device=g.device).index_add(
                    0, torch.arange(len(g), device=g.device) // group, sq)
                norm = per_group.sqrt()[torch.arange(len(g), device=g.device) // group][:, None]
            u = F.normalize(u + step_size * g / norm, dim=-1)
    return u


class CLIPure:
    """CLIPure-Cos: zero-shot logits 100 · u_N · T of the purified embedding u_N = clipure_cos(f(x), t). Deterministic.
    group=1: the per-image form (the default: a result does not depend on batching); group=2: the official batch
    form at the official code's batch size of 2, each two consecutive rows of a call normalised together."""

    name, randomised = "clipure-cos", False

    def __init__(self, zs, seed, steps=10, step_size=30.0, group=1):
        if zs.null_text is None:
            raise ValueError("CLIPure needs the null-template text embedding")
        self.zs, self.steps, self.step_size, self.group = zs, steps, step_size, group
        self.settings = {"steps": steps, "step_size": step_size, "group": group}

    def purified(self, x, create_graph=False):
        return clipure_cos(self.zs.encoder(x), self.zs.null_text, self.steps, self.step_size, self.group,
                           create_graph)

    def predict(self, x, index, draw):
        with torch.no_grad():
            e = self.zs.encoder(x)
        return self.zs.logits_of_embedding(clipure_cos(e, self.zs.null_text, self.steps, self.step_size,
                                                       self.group)).detach()

    def view(self, mode, x, index, eot=8, draws=1):
        """logits_fn for the attacker in `mode`:
        authors        through the purifier as the official code runs it: g detached (no second-order path)
        exact          through the purifier with the second-order path (double backward)
        bpda-identity  the purifier's output forward, the identity backward (∂u_N/∂u₀ taken as I)"""
        if mode == "bpda-identity":
            def logits_fn(z):
                u0 = F.normalize(self.zs.encoder(z).float(), dim=-1)
                u = clipure_cos(u0.detach(), self.zs.null_text, self.steps, self.step_size, self.group)
                return self.zs.logits_of_embedding(u0 + (u - u0).detach())
            return logits_fn
        exact = mode == "exact"
        return lambda z: self.zs.logits_of_embedding(self.purified(z, create_graph=exact))


# ------------------------------------------------------------------------------------------------------ registry
# name -> (class, its settings with defaults). A third defence is one class with predict(x, index, draw), view(mode,
# x, index, eot, draws), `randomised` and `settings`, and one entry here and in ADAPTIVE_VIEWS and AUTHORS_VIEW.
DEFENSES = {"ttc": (TTC, TTC_DEFAULTS), "clipure-cos": (CLIPure, CLIPURE_DEFAULTS)}
ATTACK_MODES = ("non-adaptive", "authors", "known-noise", "adaptive")
# the views an adaptive attacker differentiates (each attack is run through each; the per-image worst case counts),
# besides Square on the defended model and, for TTC, the attack on its gate
ADAPTIVE_VIEWS = {"ttc": ("bpda-eot",), "clipure-cos": ("exact", "bpda-identity")}
# the authors' attack: None = crafted on the undefended model (TTC's protocol), else the view their code attacks
AUTHORS_VIEW = {"ttc": None, "clipure-cos": "authors"}


def build_defense(name, zs, seed, **settings):
    cls, defaults = DEFENSES[name]
    return cls(zs, seed, **{**defaults, **{k: v for k, v in settings.items() if v is not None}})
