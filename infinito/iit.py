"""INFINITO's IIT-inspired parts: PHI metrics, learnable phi weights, exploration noise, memory.

Each part is a small module with one job and a stated contract; ``infinito/model.py`` wires
them into the backbone. Shapes: B batch, T tokens, D model width, H heads, Dh head width,
n chunks of C tokens per sequence, S memory slots, N write candidates.

PHI (an integrated-information proxy, not Tononi's Phi) is measured per chunk of C tokens:

    PHI = 10 * sum_k w_k * c_k,  w = softmax(logits),  c_k in [0, 1]

so PHI and the memory threshold share the scale [0, 10]. The four components c_k are defined
in ``ImprovedIITMetrics``; every one varies with the input and is differentiable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinito.config import ModelConfig

COMPONENTS = ("temporal_coherence", "integration", "complexity", "attention_diversity")
PHI_SCALE = 10.0
_EPS = 1e-8
_MASKED = -1e9  # finite "minus infinity": keeps 0 * log(0) terms at exactly 0 in the backward pass


def chunk_length(seq_len: int, phi_chunk: int) -> int:
    """Tokens per PHI chunk for a sequence of ``seq_len``: ``phi_chunk``, or the whole sequence
    when it is shorter. Trailing tokens that do not fill a chunk are left out of PHI."""
    return min(phi_chunk, seq_len)


class ImprovedIITMetrics(nn.Module):
    """Four PHI components per chunk, each in [0, 1]. No parameters.

    Contract: ``forward(states, q, k, chunk)`` with states (B, T, D) and the causal attention's
    queries and keys (B, H, T, Dh) returns (B, n, 4), n = T // chunk, components in the order of
    ``COMPONENTS``.

    Each state x_t of a chunk is taken as a unit vector u_t = x_t / |x_t|, and a set of them as
    the mixture rho = mean_t u_t u_t^T (a density matrix: unit trace, eigenvalues s_i^2 / C for
    s the singular values of the stacked u_t). Everything below is read off the chunk's Gram
    matrix G = u u^T (C x C): with the halves A = u_1..u_h and B = u_{h+1}..u_C (h = C // 2),

    - temporal coherence  = mean_t cos(x_t, x_{t+1})^2 = mean_t G[t, t+1]^2       (t = 1..C-1)
                            overlap of consecutive states: 0 when orthogonal, 1 when parallel
    - integration         = <rho_A, rho_B> / (|rho_A| |rho_B|) = |G_AB|^2 / (|G_AA| |G_BB|)
                            the cosine between the halves' density matrices (Hilbert-Schmidt
                            inner product, Frobenius norms): 1 when both halves spread over the
                            same directions in the same proportions, 0 when they share none
    - complexity          = S2(rho) / log(min(C, D)),  S2(rho) = -log tr(rho^2)
                                                                = log(tr(G)^2 / |G|^2)
                            the Renyi-2 (collision) entropy of the singular-value spectrum
                            p_i = s_i^2 / sum s^2, normalised by its largest value: 0 when the
                            chunk repeats one direction, 1 when it spreads evenly over as many
                            as it can
    - attention diversity = mean over heads and queries i = 2..C of H(a_i) / log(i), a_i the
                            causal softmax row of query i over keys 1..i of its chunk; 1 when
                            every query spreads evenly over its past, 0 when each attends to one
                            token. Entropy per row, then averaged: the entropy of an averaged
                            attention map would be near 1 whatever the rows are.

    Unrelated states (random directions, D much larger than C) give coherence and integration
    near 0, so those rise only with structure. The order-2 entropy needs no eigen- or
    singular-value decomposition: those synchronise a CUDA device with the host and their
    batched CPU kernels are slow, while Gram-matrix sums are matrix products with plain, finite
    gradients. Runs in float32.
    """

    def forward(self, states: Tensor, q: Tensor, k: Tensor, chunk: int) -> Tensor:
        B, T, D = states.shape
        n, h = T // chunk, chunk // 2
        u = F.normalize(states[:, : n * chunk].float(), dim=-1, eps=_EPS)
        u = u.reshape(B * n, chunk, D)  # (B*n, C, D)
        gram = u @ u.transpose(-1, -2)  # (B*n, C, C)
        coherence = gram.diagonal(offset=1, dim1=-2, dim2=-1).pow(2).mean(-1)  # (B*n,)
        sq = gram.pow(2)
        across = sq[:, :h, h:].sum((-1, -2))
        within = sq[:, :h, :h].sum((-1, -2)) * sq[:, h:, h:].sum((-1, -2))
        integration = across / within.clamp_min(_EPS).sqrt()
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        renyi2 = (trace.pow(2).clamp_min(_EPS) / sq.sum((-1, -2)).clamp_min(_EPS)).log()
        complexity = renyi2 / math.log(max(min(chunk, D), 2))
        per_chunk = torch.stack([coherence, integration, complexity], dim=-1).clamp(0, 1)
        diversity = self.attention_diversity(q, k, chunk, n)  # (B, n)
        return torch.cat([per_chunk.view(B, n, 3), diversity[..., None]], dim=-1)  # (B, n, 4)

    @staticmethod
    def attention_diversity(q: Tensor, k: Tensor, chunk: int, n: int) -> Tensor:
        """Mean normalised entropy of each chunk's causal attention rows; q, k (B, H, T, Dh)."""
        B, H, _, Dh = q.shape
        qc = q[:, :, : n * chunk].float().reshape(B, H, n, chunk, Dh)  # (B, H, n, C, Dh)
        kc = k[:, :, : n * chunk].float().reshape(B, H, n, chunk, Dh)  # (B, H, n, C, Dh)
        scores = qc @ kc.transpose(-1, -2) / math.sqrt(Dh)  # (B, H, n, C, C)
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
        logp = scores.masked_fill(~causal, _MASKED).log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, H, n, C)
        # query i (0-based) sees i + 1 keys, so its largest entropy is log(i + 1); query 0 has none
        max_entropy = torch.arange(1, chunk + 1, device=q.device, dtype=torch.float32).log()
        normalised = entropy[..., 1:] / max_entropy[1:]  # (B, H, n, C-1)
        return normalised.mean((1, 3)).clamp(0, 1)  # (B, n)


class LearnablePhiWeights(nn.Module):
    """PHI = 10 * sum_k softmax(logits)_k * c_k, for components c (..., 4) -> PHI (...).

    The logits start at log(0.3, 0.3, 0.2, 0.2), so the initial weights are the seed's. They are
    trained only through the Delta-Phi auxiliary loss (PHI read by the memory is detached).
    """

    INIT = (0.3, 0.3, 0.2, 0.2)

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(self.INIT).log())

    def weights(self) -> Tensor:
        return self.logits.softmax(-1)

    def forward(self, components: Tensor) -> Tensor:
        return PHI_SCALE * (components * self.weights()).sum(-1)


class StochasticExploration(nn.Module):
    """Gaussian noise on hidden states while training; the identity in eval and generation.

    The noise is relative: std = noise_std * RMS of each token's state (not back-propagated),
    so its strength does not drift as the residual stream grows during training. Each token's
    noise is drawn independently, so the noise does not carry information between positions.
    """

    def __init__(self, noise_std: float) -> None:
        super().__init__()
        self.noise_std = noise_std

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.noise_std == 0:
            return x
        rms = x.detach().pow(2).mean(-1, keepdim=True).sqrt()  # (B, T, 1)
        return x + self.noise_std * rms * torch.randn_like(x)


class MemoryCandidates(NamedTuple):
    """What one forward pass offers the memory; all detached.

    keys, values (N, D): the residual stream at the memory point, at each chunk's last token
    (keys: what the chunk led to) and averaged over the chunk (values: what it contained).
    phi (N,): each chunk's PHI. slot_mass (S,) or None: the attention mass each slot received in
    this call's reads (None when reads were disabled), used to update the usage statistics.
    """

    keys: Tensor
    values: Tensor
    phi: Tensor
    slot_mass: Tensor | None

    @staticmethod
    def cat(parts: list[MemoryCandidates]) -> MemoryCandidates:
        """Join candidates from several processes (DDP): stack the chunks, average slot mass."""
        masses = [p.slot_mass for p in parts if p.slot_mass is not None]
        return MemoryCandidates(
            keys=torch.cat([p.keys for p in parts]),
            values=torch.cat([p.values for p in parts]),
            phi=torch.cat([p.phi for p in parts]),
            slot_mass=torch.stack(masses).mean(0) if masses else None,
        )


class IITGuidedMemory(nn.Module):
    """An S-slot external memory of chunk summaries, read by every position, written by PHI.

    State (persistent buffers, so saved and resumed with the weights): ``keys``, ``values``
    (S, D) raw residual-stream vectors, ``phi`` (S,) the PHI of the chunk each slot came from,
    ``usage`` (S,) an EMA of the normalised attention mass each slot received, ``age`` (S,)
    writes since the slot was filled, ``valid`` (S,) which slots hold something.

    Read (``forward``, differentiable): every position t attends, per head, over the valid slots
    and a learned null slot whose value is zero:

        logit_ts = q_t . k_s / sqrt(Dh) + log sigmoid((phi_s - threshold) / temperature)

    with q = W_q LN(x_t), k = W_k LN(keys_s), v = W_v LN(values_s), and the read
    W_o sum_s a_ts v_s is added to the residual stream. Slots whose PHI lies below the
    threshold are faded out of the softmax, and mass can go to the null slot, so a memory of
    low-PHI or no slots reads as (exactly, when empty) zero. The threshold = softplus(rho) > 0
    enters the logits, so it is trained by the language-model loss. The projections act on the
    stored vectors at read time, so they too are trained by that loss.

    Write (``write``, no gradient, outside forward): see ``write``. Reads see only the buffers as
    they were when the forward pass started, so a write becomes visible from the next call.
    Writes and ``reset`` change the buffers in place: they keep their storage, so a CUDA graph
    captured over the forward pass (``torch.compile(mode="reduce-overhead")``) reads the memory
    as it is now. A read that builds an autograd graph reads copies of the buffers, so a write
    before that graph's backward pass leaves it valid.
    """

    USAGE_DECAY = 0.9  # EMA factor for slot usage: about the last ten reads count

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, S = cfg.d_model, cfg.memory_slots
        self.n_head, self.temperature = cfg.n_head, cfg.threshold_temperature
        self.ln = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D, bias=False)  # no bias: an empty memory adds exactly 0
        self.null_logit = nn.Parameter(torch.zeros(cfg.n_head))
        # softplus^-1(threshold_init), so that softplus(rho) starts at threshold_init
        self.threshold_raw = nn.Parameter(torch.tensor(math.log(math.expm1(cfg.threshold_init))))
        self.register_buffer("keys", torch.zeros(S, D))
        self.register_buffer("values", torch.zeros(S, D))
        self.register_buffer("phi", torch.zeros(S))
        self.register_buffer("usage", torch.zeros(S))
        self.register_buffer("age", torch.zeros(S, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(S, dtype=torch.bool))
        self._frozen: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def threshold(self) -> Tensor:
        return F.softplus(self.threshold_raw)

    def _slots(self) -> tuple[Tensor, Tensor, Tensor]:
        """The slots as the reads see them: keys, values (H, S, Dh) and the logit bias (S,)."""
        if self._frozen is not None:
            return self._frozen
        keys, values, phi, valid = self.keys, self.values, self.phi, self.valid
        if torch.is_grad_enabled():  # the graph saves copies: later in-place writes spare them
            keys, values, phi, valid = keys.clone(), values.clone(), phi.clone(), valid.clone()
        S, D = keys.shape
        H = self.n_head
        k = self.k_proj(self.ln(keys)).view(S, H, D // H).transpose(0, 1)  # (H, S, Dh)
        v = self.v_proj(self.ln(values)).view(S, H, D // H).transpose(0, 1)  # (H, S, Dh)
        gate = F.logsigmoid((phi - self.threshold) / self.temperature)  # (S,)
        bias = torch.where(valid, gate, torch.full_like(gate, -math.inf))  # (S,)
        return k, v, bias

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Reads inside the block reuse one computation of the slots' projections and gates.

        For generation, which reads many times without writing or training: otherwise every
        decode step would project all S slots again. The block must not write the memory or
        change its parameters; reads in it return no slot mass (usage is not tracked).
        """
        with torch.no_grad():
            self._frozen = self._slots()
        try:
            yield
        finally:
            self._frozen = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Read for every position of x (B, T, D): returns the read (B, T, D) and the attention
        mass per slot averaged over batch, heads and positions (S,), detached (None inside
        ``frozen``)."""
        B, T, D = x.shape
        S, H = self.keys.shape[0], self.n_head
        q = self.q_proj(self.ln(x)).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        k, v, bias = self._slots()
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H) + bias.to(q.dtype)  # (B, H, T, S)
        null = self.null_logit.to(q.dtype).view(1, H, 1, 1).expand(B, H, T, 1)  # (B, H, T, 1)
        attn = torch.cat([scores, null], dim=-1).softmax(-1)[..., :S]  # (B, H, T, S)
        read = (attn @ v.to(attn.dtype)).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        if self._frozen is not None:
            return self.out_proj(read), None
        return self.out_proj(read), attn.detach().float().mean((0, 1, 2))

    @torch.no_grad()
    def write(self, cand: MemoryCandidates, priority_weight: float) -> dict[str, Tensor]:
        """Apply one forward pass's candidates; returns write statistics as 0-dim tensors.

        1. usage <- decay * usage + (1 - decay) * slot_mass / max(slot_mass) on valid slots;
           every valid slot ages by one.
        2. Candidates with PHI > threshold are accepted, highest PHI first (at most S).
        3. They go to free slots first, then evict valid slots in increasing order of
           priority = w * PHI / 10 + (1 - w) * usage, the oldest first among equal priorities.
        The new contents are computed first and then copied into the buffers in place (their
        storage, and so a captured CUDA graph's view of them, stays the same).

        Fixed shapes throughout: the K = min(N, S) best-ranked candidates are paired with the
        K first slots of the eviction order, and only the accepted pairs change a slot
        (``torch.where``). How many were accepted is never read on the host, so a CUDA device
        is not synchronised and the next step can be queued while this one runs.
        """
        S, N = self.keys.shape[0], cand.phi.shape[0]
        valid, usage, age = self.valid, self.usage, self.age
        if cand.slot_mass is not None:
            mass = cand.slot_mass.to(usage) / cand.slot_mass.max().clamp_min(_EPS)
            decay = self.USAGE_DECAY
            usage = torch.where(valid, decay * usage + (1 - decay) * mass, torch.zeros_like(usage))
        age = torch.where(valid, age + 1, torch.zeros_like(age))

        phi = cand.phi.to(self.phi)
        accepted = phi > self.threshold.detach()
        K = min(N, S)
        ranked = torch.where(accepted, phi, torch.full_like(phi, -math.inf))
        source = ranked.argsort(descending=True, stable=True)[:K]  # (K,) accepted ones first
        take = accepted[source]  # (K,) a prefix of True: the accepted candidates

        priority = priority_weight * self.phi / PHI_SCALE + (1 - priority_weight) * usage
        order = age.argsort(descending=True, stable=True)  # oldest first ...
        order = order[priority[order].argsort(stable=True)]  # ... within equal priority
        order = order[valid[order].to(torch.uint8).argsort(stable=True)]  # free slots first
        slots = order[:K]  # (K,) distinct slots, paired with source

        def put(buffer: Tensor, new: Tensor) -> Tensor:
            new = new.to(buffer)
            mask = take.view(-1, *([1] * (new.dim() - 1)))
            return buffer.index_copy(0, slots, torch.where(mask, new, buffer[slots]))

        evictions = (valid[slots] & take).sum()
        new = {
            "keys": put(self.keys, cand.keys[source]),
            "values": put(self.values, cand.values[source]),
            "phi": put(self.phi, phi[source]),
            "usage": put(usage, torch.zeros_like(usage[:K])),
            "age": put(age, torch.zeros_like(age[:K])),
            "valid": put(valid, torch.ones_like(valid[:K])),
        }
        for name, value in new.items():
            getattr(self, name).copy_(value)
        stats = self.stat_tensors()
        zero = torch.zeros((), device=phi.device)
        return {
            "candidates": torch.full((), float(N), device=phi.device),
            "writes": take.sum().float(),
            "evictions": evictions.float(),
            "memory_utilisation": stats["memory_utilisation"],
            "stored_phi_mean": stats["stored_phi_mean"],
            "candidate_phi_mean": phi.mean() if N else zero,
        }

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every slot (in place: shapes, devices and storage kept)."""
        for name in ("keys", "values", "phi", "usage", "age", "valid"):
            getattr(self, name).zero_()

    @torch.no_grad()
    def stat_tensors(self) -> dict[str, Tensor]:
        """``stats`` as 0-dim tensors on the memory's device (no host synchronisation)."""
        valid = self.valid.float()
        return {
            "memory_utilisation": valid.mean(),
            "stored_phi_mean": (self.phi * valid).sum() / valid.sum().clamp_min(1.0),
            "threshold": self.threshold.detach(),
        }

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Utilisation (fraction of valid slots), mean stored PHI (0 when empty), threshold."""
        stats = self.stat_tensors()
        return dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))
