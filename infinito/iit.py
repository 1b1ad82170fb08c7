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
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinito.config import ModelConfig

COMPONENTS = ("temporal_coherence", "integration", "complexity", "attention_diversity")
PHI_SCALE = 10.0
_EPS = 1e-8
_MASKED = -1e9  # finite "minus infinity": keeps 0 * log(0) terms at exactly 0 in the backward pass
PHI_STATS_MOMENTUM = 0.05  # EMA factor of the running PHI statistics: about the last 20 writes
PHI_SPREAD_FLOOR = 1e-2  # smallest PHI standard deviation the standardised threshold uses
PERCENTILES = (10, 50, 90)  # of accepted and rejected candidates' PHI, in the write statistics
# What a write says about the memory's selection, for the training history and the metrics.
WRITE_STATS = (
    "memory_accepted_fraction",
    "memory_written_fraction",
    "memory_evicted_age",
    *(f"memory_{kind}_phi_p{q}" for kind in ("accepted", "rejected") for q in PERCENTILES),
)


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

    The chunks come in G groups, each written into one row of the memory. keys, values
    (G, N, D): the residual stream at the memory point, at each chunk's last token (keys: what
    the chunk led to) and averaged over the chunk (values: what it contained). phi (G, N): each
    chunk's PHI. slot_mass (G, S) or None: the attention mass each slot of the group's row
    received in this call's reads (None when reads were disabled), for the usage statistics.
    rows (G,) or None: the memory row of each group; None is the shared memory, one group of
    every batch row's chunks (G = 1) for its single row.
    """

    keys: Tensor
    values: Tensor
    phi: Tensor
    slot_mass: Tensor | None
    rows: Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[tuple[MemoryCandidates, float]]) -> MemoryCandidates:
        """Join several forward passes' candidates (micro-batches, processes) in order.

        ``parts``: (candidates, weight) pairs, the weight being the windows the pass read.
        Shared memory: the chunks join into one group and the slot mass is the weighted mean.
        Stream memory: the groups (rows) are stacked.
        """
        cands = [c for c, _ in parts]
        if any((c.rows is None) != (cands[0].rows is None) for c in cands):
            raise ValueError("cannot join shared-memory and stream-memory candidates")
        masses = [c.slot_mass for c in cands]
        have_mass = all(m is not None for m in masses)
        if cands[0].rows is None:
            mass = None
            if have_mass:
                total = sum(w for _, w in parts)
                mass = sum(m * (w / total) for m, (_, w) in zip(masses, parts, strict=True))
            return MemoryCandidates(
                keys=torch.cat([c.keys for c in cands], dim=1),
                values=torch.cat([c.values for c in cands], dim=1),
                phi=torch.cat([c.phi for c in cands], dim=1),
                slot_mass=mass,  # type: ignore[arg-type]
            )
        return MemoryCandidates(
            keys=torch.cat([c.keys for c in cands]),
            values=torch.cat([c.values for c in cands]),
            phi=torch.cat([c.phi for c in cands]),
            slot_mass=torch.cat(masses) if have_mass else None,  # type: ignore[arg-type]
            rows=torch.cat([c.rows for c in cands]),  # type: ignore[misc]
        )


def percentiles(x: Tensor, member: Tensor, levels: Sequence[float] = PERCENTILES) -> Tensor:
    """Percentiles (linear interpolation, as ``torch.quantile``) of ``x[member]``, all NaN when
    nothing is a member. Fixed shapes and no host read: members are sorted to the front."""
    x, member = x.flatten().float(), member.flatten()
    ordered = torch.where(member, x, torch.full_like(x, math.inf)).sort().values
    n = member.sum()
    # each level as a device fill, not a tensor built on the host and copied over
    q = torch.stack([torch.full((), level / 100, device=x.device) for level in levels])
    pos = q * (n - 1).clamp_min(0).float()
    lo, hi = pos.floor().long(), pos.ceil().long()
    value = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo.float())
    return torch.where(n > 0, value, torch.full_like(value, math.nan))


class IITGuidedMemory(nn.Module):
    """An external memory of chunk summaries in R rows of S slots, read by every position and
    written by PHI.

    Rows: ``model.memory_scope: shared`` (the seed's) keeps one row that every batch row reads
    and every chunk is offered to; ``stream`` keeps one row per stream (batch row), read and
    written by that stream only (``reset(rows=R)`` sizes it; ``clear`` empties single rows).

    State (persistent buffers, saved and resumed with the weights): ``keys``, ``values``
    (R, S, D) raw residual-stream vectors, ``phi`` (R, S) the PHI of the chunk each slot came
    from, ``usage`` (R, S) an EMA of the normalised attention mass each slot received, ``age``
    (R, S) writes since the slot was filled, ``valid`` (R, S) which slots hold something. With
    the standardised threshold also ``phi_running_mean``, ``phi_running_var`` (EMAs of the
    candidates' PHI over the writes in training mode, one estimate for all rows) and
    ``phi_stats_ready``; ``reset`` keeps them: they calibrate the threshold, like a
    BatchNorm's running statistics, and evaluation does not change them.

    The threshold, on the PHI scale (``threshold``):

    - ``absolute`` (the seed's): softplus(rho), starting at ``threshold_init``;
    - ``standardised``: mu + sigma * z, mu and sigma the running mean and standard deviation of
      candidate PHI, z a learned parameter starting at ``threshold_z_init``. The Delta-Phi
      loss moves PHI during training; this threshold moves with it and keeps a share of the
      candidates on either side.

    Read (``forward``, differentiable): every position t attends, per head, over its row's valid
    slots and a learned null slot whose value is zero:

        logit_ts = q_t . k_s / sqrt(Dh) + log sigmoid((phi_s - threshold) / (temperature * spread))

    with q = W_q LN(x_t), k = W_k LN(keys_s), v = W_v LN(values_s), spread = sigma
    (standardised; the temperature is then in standard deviations) or 1 (absolute), and the
    read W_o sum_s a_ts v_s is added to the residual stream. Slots whose PHI lies below the
    threshold are faded out of the softmax, and mass can go to the null slot, so a memory of
    low-PHI or no slots reads as (exactly, when empty) zero. The threshold enters the logits,
    so the language-model loss trains it; the projections act on the stored vectors at read
    time, so that loss trains them too.

    Write (``write``, no gradient, outside forward): see ``write``. Reads see only the buffers as
    they were when the forward pass started, so a write becomes visible from the next call.

    Writes, ``clear`` and ``reset`` change the buffers in place while their shapes stay (a stream
    memory's ``reset`` to another number of rows is the exception): they keep their storage, so
    a CUDA graph captured over the forward pass (``torch.compile(mode="reduce-overhead")``)
    reads the memory as it is now. A read that builds an autograd graph reads copies of the
    buffers, so a write before that graph's backward pass leaves it valid.
    """

    USAGE_DECAY = 0.9  # EMA factor for slot usage: about the last ten reads count
    SLOT_BUFFERS = ("keys", "values", "phi", "usage", "age", "valid")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, S = cfg.d_model, cfg.memory_slots
        self.n_head, self.temperature = cfg.n_head, cfg.threshold_temperature
        self.stream = cfg.memory_scope == "stream"
        self.standardised = cfg.threshold_mode == "standardised"
        # at most this many slots change per write: about 1 / write_fraction writes per slot
        self.write_budget = max(1, math.ceil(cfg.memory_write_fraction * S))
        self.ln = nn.LayerNorm(D)
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D, bias=False)  # no bias: an empty memory adds exactly 0
        self.null_logit = nn.Parameter(torch.zeros(cfg.n_head))
        if self.standardised:
            self.threshold_raw = nn.Parameter(torch.tensor(float(cfg.threshold_z_init)))
            self.register_buffer("phi_running_mean", torch.zeros(()))
            self.register_buffer("phi_running_var", torch.zeros(()))
            self.register_buffer("phi_stats_ready", torch.zeros((), dtype=torch.bool))
        else:  # softplus^-1(threshold_init), so that softplus(rho) starts at threshold_init
            init = math.log(math.expm1(cfg.threshold_init))
            self.threshold_raw = nn.Parameter(torch.tensor(init))
        self.register_buffer("keys", torch.zeros(1, S, D))
        self.register_buffer("values", torch.zeros(1, S, D))
        self.register_buffer("phi", torch.zeros(1, S))
        self.register_buffer("usage", torch.zeros(1, S))
        self.register_buffer("age", torch.zeros(1, S, dtype=torch.long))
        self.register_buffer("valid", torch.zeros(1, S, dtype=torch.bool))
        self._frozen: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def rows(self) -> int:
        return self.keys.shape[0]

    @property
    def spread(self) -> Tensor:
        """The PHI unit of the read gate: sigma of candidate PHI (standardised), else 1."""
        if not self.standardised:
            return torch.ones((), device=self.threshold_raw.device)
        return self.phi_running_var.clamp_min(0).sqrt().clamp_min(PHI_SPREAD_FLOOR)

    @property
    def threshold(self) -> Tensor:
        """The write and read threshold on the PHI scale (differentiable in its parameter)."""
        if self.standardised:
            return self.phi_running_mean + self.spread * self.threshold_raw
        return F.softplus(self.threshold_raw)

    def _slots(self, rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The slots of ``rows`` (None: all) as reads see them: keys, values (G, H, S, Dh) and
        the logit bias (G, S)."""
        if self._frozen is not None:
            k, v, bias = self._frozen
            if rows is None:
                return k, v, bias
            return k.index_select(0, rows), v.index_select(0, rows), bias.index_select(0, rows)
        keys, values, phi, valid = self.keys, self.values, self.phi, self.valid
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
            phi, valid = phi.index_select(0, rows), valid.index_select(0, rows)
        elif torch.is_grad_enabled():  # the graph saves copies: later in-place writes spare them
            keys, values, phi, valid = keys.clone(), values.clone(), phi.clone(), valid.clone()
        G, S, D = keys.shape
        H = self.n_head
        k = self.k_proj(self.ln(keys)).view(G, S, H, D // H).transpose(1, 2)  # (G, H, S, Dh)
        v = self.v_proj(self.ln(values)).view(G, S, H, D // H).transpose(1, 2)  # (G, H, S, Dh)
        gate = F.logsigmoid((phi - self.threshold) / (self.temperature * self.spread))  # (G, S)
        bias = torch.where(valid, gate, torch.full_like(gate, -math.inf))  # (G, S)
        return k, v, bias

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Reads inside the block reuse one computation of the slots' projections and gates.

        For generation, which reads many times without writing or training: otherwise every
        decode step would project all slots again. The block must not write the memory or
        change its parameters; reads in it return no slot mass (usage is not tracked).
        """
        with torch.no_grad():
            self._frozen = self._slots(None)
        try:
            yield
        finally:
            self._frozen = None

    def read_rows(self, batch: int, rows: Tensor | None) -> Tensor | None:
        """The memory row of each of ``batch`` batch rows: None for the shared memory (row 0
        for all), else ``rows`` or, when None, rows 0..batch-1. Shapes are checked here."""
        if not self.stream:
            return None
        if rows is None:
            if batch > self.rows:
                raise ValueError(
                    f"the stream memory holds {self.rows} rows but the batch has {batch}; call "
                    f"reset_memory(rows={batch}) first (one memory per stream) or pass memory_rows"
                )
            return torch.arange(batch, device=self.keys.device)
        if rows.shape != (batch,):
            raise ValueError(f"memory_rows must have shape ({batch},), got {tuple(rows.shape)}")
        return rows

    def forward(self, x: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Read for every position of x (B, T, D); ``rows`` (B,) the memory row of each batch
        row (stream scope; see ``read_rows``). Returns the read (B, T, D) and the attention mass
        per slot of each read row, averaged over heads, positions (and, shared, the batch):
        (G, S), detached (None inside ``frozen``)."""
        B, T, D = x.shape
        S, H = self.keys.shape[1], self.n_head
        rows = self.read_rows(B, rows)
        q = self.q_proj(self.ln(x)).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, Dh)
        k, v, bias = self._slots(rows)  # (G, H, S, Dh), G = 1 (shared) or B (stream)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)  # (B, H, T, S)
        scores = scores + bias.to(q.dtype)[:, None, None, :]
        null = self.null_logit.to(q.dtype).view(1, H, 1, 1).expand(B, H, T, 1)  # (B, H, T, 1)
        attn = torch.cat([scores, null], dim=-1).softmax(-1)[..., :S]  # (B, H, T, S)
        read = (attn @ v.to(attn.dtype)).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        if self._frozen is not None:
            return self.out_proj(read), None
        mass = attn.detach().float().mean((1, 2))  # (B, S)
        return self.out_proj(read), mass if self.stream else mass.mean(0, keepdim=True)

    @torch.no_grad()
    def _write_threshold(self, phi: Tensor) -> Tensor:
        """The threshold this write applies to candidates ``phi``. Standardised: a write in
        training mode first folds the candidates into the running mean and variance (the first
        one starts them); in eval mode they stay as training left them, and a model that never
        wrote in training standardises each write by its own candidates."""
        if not self.standardised or phi.numel() == 0:
            return self.threshold.detach()
        mean, var = phi.mean(), phi.var(unbiased=False)
        ready = self.phi_stats_ready
        if self.training:
            m = PHI_STATS_MOMENTUM
            new_mean = torch.where(ready, (1 - m) * self.phi_running_mean + m * mean, mean)
            new_var = torch.where(ready, (1 - m) * self.phi_running_var + m * var, var)
            self._assign("phi_running_mean", new_mean)
            self._assign("phi_running_var", new_var)
            self._assign("phi_stats_ready", torch.ones_like(ready))
            ready = self.phi_stats_ready
        mean = torch.where(ready, self.phi_running_mean, mean)
        spread = torch.where(ready, self.phi_running_var, var).clamp_min(0).sqrt()
        return mean + spread.clamp_min(PHI_SPREAD_FLOOR) * self.threshold_raw.detach()

    @torch.no_grad()
    def write(self, cand: MemoryCandidates, priority_weight: float) -> dict[str, Tensor]:
        """Apply one forward pass's candidates; returns write statistics as 0-dim tensors.

        Per group of candidates and its memory row:

        1. usage <- decay * usage + (1 - decay) * slot_mass / max(slot_mass) on valid slots;
           every valid slot ages by one. (Standardised threshold, training mode: the running PHI
           statistics take in every group's candidates first; see ``_write_threshold``.)
        2. Candidates with PHI > threshold are accepted, highest PHI first, at most
           K = min(N, write budget) of them (budget: ceil(memory_write_fraction * S)).
        3. They go to free slots first, then evict valid slots in increasing order of
           priority = w * PHI / 10 + (1 - w) * usage, the oldest first among equal priorities.

        The new contents are computed first and then copied into the buffers in place (their
        storage, and so a captured CUDA graph's view of them, stays the same; see ``_assign``).
        Fixed shapes throughout: the K best-ranked candidates are paired with the K first slots
        of the eviction order, and only the accepted pairs change a slot (``torch.where``). Nothing
        is read on the host, so a CUDA device is not synchronised and the next step can be
        queued while this one runs.
        """
        G, N = cand.phi.shape
        rows = cand.rows
        if rows is None and self.rows != G:
            raise ValueError(f"{G} candidate groups without rows for {self.rows} memory rows")

        def of_rows(buffer: Tensor) -> Tensor:  # (G, S, ...)
            return buffer if rows is None else buffer.index_select(0, rows)

        valid, usage, age = of_rows(self.valid), of_rows(self.usage), of_rows(self.age)
        slot_phi = of_rows(self.phi)
        phi = cand.phi.to(self.phi)
        threshold = self._write_threshold(phi)
        accepted = phi > threshold  # (G, N)
        if cand.slot_mass is not None:
            mass = cand.slot_mass.to(usage)
            mass = mass / mass.amax(-1, keepdim=True).clamp_min(_EPS)
            decay = self.USAGE_DECAY
            usage = torch.where(valid, decay * usage + (1 - decay) * mass, torch.zeros_like(usage))
        age = torch.where(valid, age + 1, torch.zeros_like(age))

        K = min(N, self.write_budget)
        ranked = torch.where(accepted, phi, torch.full_like(phi, -math.inf))
        # (G, K): the accepted candidates first, highest PHI first
        source = ranked.argsort(dim=-1, descending=True, stable=True)[:, :K]
        take = accepted.gather(1, source)  # (G, K) a prefix of True: the accepted candidates

        priority = priority_weight * slot_phi / PHI_SCALE + (1 - priority_weight) * usage
        order = age.argsort(dim=-1, descending=True, stable=True)  # oldest first ...
        by_priority = priority.gather(1, order).argsort(dim=-1, stable=True)
        order = order.gather(1, by_priority)  # ... within equal priority
        free_first = valid.gather(1, order).to(torch.uint8).argsort(dim=-1, stable=True)
        slots = order.gather(1, free_first)[:, :K]  # (G, K) distinct slots, paired with source
        evicted = valid.gather(1, slots) & take  # (G, K)
        evicted_age = age.gather(1, slots)

        def put(buffer: Tensor, new: Tensor) -> Tensor:
            new = new.to(buffer)
            tail = [1] * (new.dim() - 2)
            index = slots.view(G, K, *tail).expand_as(new)
            keep = buffer.gather(1, index)
            return buffer.scatter(1, index, torch.where(take.view(G, K, *tail), new, keep))

        def pick(x: Tensor) -> Tensor:  # (G, N, ...) -> (G, K, ...), the ranked candidates
            index = source.view(G, K, *([1] * (x.dim() - 2))).expand(G, K, *x.shape[2:])
            return x.gather(1, index)

        self._store("keys", put(of_rows(self.keys), pick(cand.keys)), rows)
        self._store("values", put(of_rows(self.values), pick(cand.values)), rows)
        self._store("phi", put(slot_phi, pick(phi)), rows)
        self._store("usage", put(usage, torch.zeros_like(usage[:, :K])), rows)
        self._store("age", put(age, torch.zeros_like(age[:, :K])), rows)
        self._store("valid", put(valid, torch.ones_like(valid[:, :K])), rows)
        return self._write_stats(phi, threshold, accepted, take, evicted, evicted_age)

    def _store(self, name: str, new: Tensor, rows: Tensor | None) -> None:
        """Write ``new`` (G, S, ...) into buffer ``name``: all of it, or its ``rows``."""
        if rows is None:
            self._assign(name, new)
        else:
            getattr(self, name).index_copy_(0, rows, new.to(getattr(self, name)))

    def _assign(self, name: str, value: Tensor) -> None:
        """Set buffer ``name`` to ``value``: in place when the shape is unchanged, so its
        storage stays put (a CUDA graph captured over the forward pass reads the memory as it
        is now); a new tensor only when a stream memory changes its number of rows."""
        buf = getattr(self, name)
        if buf.shape == value.shape:
            buf.copy_(value)
        else:
            setattr(self, name, value.to(buf))

    def _write_stats(
        self,
        phi: Tensor,
        threshold: Tensor,
        accepted: Tensor,
        take: Tensor,
        evicted: Tensor,
        evicted_age: Tensor,
    ) -> dict[str, Tensor]:
        """One write's statistics (0-dim tensors; NaN where nothing was there to measure)."""
        N = phi.numel()
        n_evicted = evicted.sum().float()
        nan = torch.full((), math.nan, device=phi.device)
        age_sum = (evicted_age * evicted).sum().float()
        stats = {
            "candidates": torch.full((), float(N), device=phi.device),
            "writes": take.sum().float(),
            "evictions": n_evicted,
            "memory_accepted_fraction": accepted.float().mean() if N else nan,
            "memory_written_fraction": take.sum().float() / N if N else nan,
            "memory_evicted_age": torch.where(n_evicted > 0, age_sum / n_evicted.clamp_min(1), nan),
            "candidate_phi_mean": phi.mean() if N else torch.zeros((), device=phi.device),
            **self.stat_tensors(),
            "threshold": threshold,  # the one this write applied
        }
        for tag, member in (("accepted", accepted), ("rejected", ~accepted)):
            for level, value in zip(PERCENTILES, percentiles(phi, member), strict=True):
                stats[f"memory_{tag}_phi_p{level}"] = value
        return stats

    @torch.no_grad()
    def reset(self, rows: int | None = None) -> None:
        """Empty every slot (in place while the number of rows stays); ``rows``: the stream
        memory gets that many rows (ignored by the shared memory, which has one)."""
        R = rows if self.stream and rows is not None else self.rows
        for name in self.SLOT_BUFFERS:
            buf = getattr(self, name)
            if buf.shape[0] == R:
                buf.zero_()
            else:
                setattr(self, name, buf.new_zeros((R, *buf.shape[1:])))

    @torch.no_grad()
    def clear(self, rows: Tensor) -> None:
        """Empty the slots of the rows where ``rows`` (R,) bool is True; fixed shapes."""
        if rows.shape != (self.rows,):
            raise ValueError(f"rows must have shape ({self.rows},), got {tuple(rows.shape)}")
        for name in self.SLOT_BUFFERS:
            buf = getattr(self, name)
            mask = rows.view(-1, *([1] * (buf.dim() - 1)))
            buf.masked_fill_(mask, 0)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A saved memory may hold another number of rows (streams): take its shape."""
        for name in self.SLOT_BUFFERS:
            saved = state_dict.get(prefix + name)
            buf = getattr(self, name)
            if saved is not None and saved.shape[1:] == buf.shape[1:] and saved.shape != buf.shape:
                setattr(self, name, buf.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args)

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
        """Utilisation (fraction of valid slots over all rows), mean stored PHI (0 when empty),
        threshold on the PHI scale."""
        stats = self.stat_tensors()
        return dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True))
