"""INFINITO V5.2: a causal GPT language model with an IIT-guided external memory.

The backbone is GPT-2 as written in nanoGPT (Karpathy): token and learned position embeddings,
``n_layer`` pre-norm blocks of causal self-attention and a 4x GELU MLP, a final LayerNorm and an
untied output head. Pre-norm (LayerNorm before each sublayer, one after the last block) keeps
an identity path from the embeddings to the head, so gradients reach every layer unscaled and
training is stable without learning-rate tricks. GPT-2's initialisation: every weight
N(0, 0.02), biases zero, and the projections that write into the residual stream scaled by
1/sqrt(2 * n_layer), because each block adds two such terms and the stream's variance would
otherwise grow with depth.

With ``config.iit`` (see ``infinito/iit.py`` for the parts and their formulas):

- at the middle of the network (before block n_layer // 2) every position reads the
  ``IITGuidedMemory`` by cross-attention and the read is added to the residual stream; Gaussian
  exploration noise is added there too while training;
- PHI is measured per chunk of ``phi_chunk`` tokens on the processed states (the last block's
  output, with the last block's attention) and on the input embeddings (with the first
  block's attention); Delta-Phi = PHI(processed) - PHI(input), and the auxiliary loss is
  ``aux = -mean(Delta-Phi) / 10``, in [-1, 1], so minimising it raises PHI. The input side is
  detached: the loss moves the processing, not the embeddings;
- each forward pass returns memory-write candidates (chunk summaries with their PHI); the
  caller applies them with ``write_memory`` after the pass, so a write is visible only from the
  next call;
- ``memory_scope: shared`` (the seed's) keeps one memory that every batch row reads and every
  chunk is offered to; ``stream`` keeps one memory per stream (batch row): row b reads and
  writes memory row ``memory_rows[b]`` only (``reset_memory(rows=R)`` sizes it,
  ``clear_memory_rows`` empties single streams at document boundaries).

Training loss: with targets, in training mode, the output head and the cross-entropy run
together block by block (``infinito/losses.py``), so the (B, T, V) logits never exist whole and
``forward`` returns no logits; ``return_logits=True`` asks for them (and computes the loss from
them, as evaluation does by default).

Causality: the logits at position t depend only on tokens <= t of the same sequence and on the
memory as it was when the call started; with stream memories, also only on the row's own
memory, so one row's tokens never reach another row's logits. ``iit=False`` is the ablation:
the same backbone, with parameters identical to the IIT model's at the same seed (the backbone
is built and initialised before any IIT part), and no memory whatever ``memory_scope`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from infinito.atomic import atomic_dir, write_json
from infinito.config import ConfigError, ModelConfig, load_params
from infinito.iit import (
    COMPONENTS,
    PHI_SCALE,
    IITGuidedMemory,
    ImprovedIITMetrics,
    LearnablePhiWeights,
    MemoryCandidates,
    StochasticExploration,
    chunk_length,
)
from infinito.losses import IGNORE_INDEX, Impl, linear_cross_entropy

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class CheckpointError(ConfigError):
    """A checkpoint directory is incomplete or does not match the model its config describes."""


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The config of the checkpoint directory ``path`` (no weights read): the one check that a
    checkpoint is there, for every stage that reads one."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path / name} not found: {path} holds no checkpoint (a directory written by "
                f"Infinito.save holds {WEIGHTS_FILE} and {CONFIG_FILE}); train first (dvc repro "
                "train) or pass --model pointing at one"
            )
    try:
        with (path / CONFIG_FILE).open(encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(_damaged(path / CONFIG_FILE, f"not valid JSON: {e}")) from e
    if not isinstance(data, dict):
        raise CheckpointError(_damaged(path / CONFIG_FILE, "not a JSON object of model keys"))
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:  # e.g. a checkpoint of another INFINITO version
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from e


def _damaged(file: Path, reason: str) -> str:
    """The message for a checkpoint file that cannot be read, with the ways to restore it."""
    return (
        f"{file} is damaged ({reason}); restore it with `dvc checkout {file.parent}` if DVC "
        f"tracks it, or write it again by training (`dvc repro -f train`)"
    )


@dataclass
class LayerCache:
    """One layer's keys and values for the tokens decoded so far.

    Buffers of (B, H, capacity, Dh) are allocated at the first update and filled in place, so a
    decode step copies one token's keys and values instead of concatenating the whole past.
    """

    capacity: int
    k: Tensor | None = None
    v: Tensor | None = None
    length: int = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, T, Dh); returns every cached position's (B, H, T_all, Dh)."""
        if self.k is None or self.v is None:
            B, H, _, Dh = k.shape
            self.k = k.new_empty(B, H, self.capacity, Dh)
            self.v = v.new_empty(B, H, self.capacity, Dh)
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot hold {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the output (B, T, D) and this call's queries and keys (B, H, T, Dh)."""
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q = q.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, T, Dh)
        v = v.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)  # (B, H, T, Dh)
        k_all, v_all = (k, v) if cache is None else cache.update(k, v)  # (B, H, T_all, Dh)
        dropout_p = self.dropout if self.training else 0.0
        if k_all.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k_all, v_all, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token after a cached prefix: it may see every cached position
            y = F.scaled_dot_product_attention(q, k_all, v_all, dropout_p=dropout_p)
        else:  # decoding after a cached prefix: query i sits at position T_all - T + i
            mask = torch.ones(T, k_all.shape[2], dtype=torch.bool, device=x.device)
            mask = mask.tril(k_all.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, D)  # (B, T, D)
        return self.resid_drop(self.c_proj(y)), q, k


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, Tensor, Tensor]:
        a, q, k = self.attn(self.ln_1(x), cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), q, k


class ModelOutput(NamedTuple):
    """What ``Infinito.forward`` returns; ``out[0]`` is the logits.

    logits (B, T, V), or None when not asked for (training with targets, see ``forward``);
    loss: mean cross-entropy over targets != -100 (IGNORE_INDEX), or None without targets;
    aux_loss: the Delta-Phi loss (an exact zero tensor when the PHI loss is off); stats: detached
    0-dim tensors of this call; candidates: memory-write candidates for ``write_memory``, or None.
    """

    logits: Tensor | None
    loss: Tensor | None
    aux_loss: Tensor
    stats: dict[str, Tensor]
    candidates: MemoryCandidates | None


class Infinito(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="infinito",
    license="mit",
    pipeline_tag="text-generation",
    tags=["infinito", "causal-lm", "iit-memory"],
):
    """INFINITO V5.2. ``Infinito(ModelConfig())`` has the seed's dimensions.

    ``PyTorchModelHubMixin`` adds ``save_pretrained``, ``from_pretrained`` (a directory or a
    Hub repo id) and ``push_to_hub``; they read and write the same two files as ``save`` and
    ``from_checkpoint``, strictly, memory buffers included (see docs/export.md).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                wpe=nn.Embedding(cfg.block_size, cfg.d_model),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.d_model),
            )
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Backbone first, IIT parts after: the ablation draws the same initial backbone weights.
        self._init_weights(self.transformer, self.lm_head)
        self.memory_layer = cfg.n_layer // 2
        self.memory = IITGuidedMemory(cfg) if cfg.use_memory else None
        self.phi_metrics = ImprovedIITMetrics() if cfg.use_phi else None
        self.phi_weights = LearnablePhiWeights() if cfg.use_phi else None
        self.noise = StochasticExploration(cfg.noise_std) if cfg.use_noise else None
        if self.memory is not None:
            self._init_weights(self.memory)
        self._reads_enabled = True
        # how the loss is computed without logits: "chunked" (PyTorch, any device) or "liger"
        self.cross_entropy: Impl = "chunked"

    def _init_weights(self, *modules: nn.Module) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for root in modules:
            for name, m in root.named_modules():
                if isinstance(m, nn.Linear):
                    residual = name.endswith("c_proj") or name.endswith("out_proj")
                    nn.init.normal_(m.weight, mean=0.0, std=residual_std if residual else 0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        memory_rows: Tensor | None = None,
        *,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """idx (B, T) token ids, T <= block_size; targets (B, T) or None; memory_rows (B,) the
        stream memory's row of each batch row (``memory_scope: stream``; None: rows 0..B-1;
        ignored by the shared memory). See ``ModelOutput``.

        ``return_logits`` (default: not when training with targets) returns the logits, and the
        loss is then computed from them; without, the loss is computed by blocks of rows
        (``infinito.losses``) and no (B, T, V) tensor is formed. Both give the same loss and
        gradients up to float rounding.
        """
        self._check_input(idx, targets)
        if return_logits is None:
            return_logits = targets is None or not self.training
        rows = None if self.memory is None else self.memory.read_rows(idx.shape[0], memory_rows)
        x0 = self._embed(idx, start=0)  # (B, T, D)
        x = self.transformer.drop(x0)
        mid, slot_mass, qk = x, None, []
        for i, block in enumerate(self.transformer.h):
            if i == self.memory_layer:
                mid = x
                x, slot_mass = self._memory_point(x, rows)
            x, q, k = block(x)
            qk.append((q, k))
        h = self.transformer.ln_f(x)  # (B, T, D)
        logits = self.lm_head(h) if return_logits else None  # (B, T, V)
        loss = None
        if targets is not None and logits is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)),
                targets.reshape(-1).long(),
                ignore_index=IGNORE_INDEX,
            )
        elif targets is not None:
            loss = linear_cross_entropy(
                h.reshape(-1, h.size(-1)),  # (B*T, D)
                self.lm_head.weight,
                targets.reshape(-1),
                impl=self.cross_entropy,
            )
        aux, stats, candidates = self._iit(x0, x, mid, slot_mass, rows, qk[0], qk[-1])
        return ModelOutput(logits, loss, aux, stats, candidates)

    def _embed(self, idx: Tensor, start: int) -> Tensor:
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)  # (T,)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, D)

    def _memory_point(self, x: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Middle of the network: add the memory read, then exploration noise (training only).

        The middle because the lower half has built contextual states to query with and the
        upper half has depth to use what was read; candidates are taken at the same point, so
        stored keys and queries live in the same representation space.
        """
        slot_mass = None
        if self.memory is not None and self._reads_enabled:
            read, slot_mass = self.memory(x, rows)
            x = x + self.transformer.drop(read)
        if self.noise is not None:
            x = self.noise(x)
        return x, slot_mass

    def _iit(
        self,
        x0: Tensor,
        h: Tensor,
        mid: Tensor,
        slot_mass: Tensor | None,
        rows: Tensor | None,
        qk_first: tuple[Tensor, Tensor],
        qk_last: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor], MemoryCandidates | None]:
        """PHI, Delta-Phi, the auxiliary loss, statistics and memory candidates of one call."""
        cfg = self.config
        aux = torch.zeros((), device=h.device)
        stats: dict[str, Tensor] = {}
        if self.memory is not None:
            stats["threshold"] = self.memory.threshold.detach()
            stats["memory_utilisation"] = self.memory.valid.float().mean()
        B, T, D = h.shape
        if self.phi_metrics is None or self.phi_weights is None or T < 2:
            return aux, stats, None
        C = chunk_length(T, cfg.phi_chunk)
        n = T // C
        # Without the PHI loss, PHI only feeds statistics and the memory: no graph needed.
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.use_phi_loss):
            components = self.phi_metrics(h, *qk_last, C)  # (B, n, 4)
            phi = self.phi_weights(components)  # (B, n)
            q0, k0 = qk_first
            phi_in = self.phi_weights(self.phi_metrics(x0.detach(), q0.detach(), k0.detach(), C))
            delta = (phi - phi_in).mean()
            if cfg.use_phi_loss:
                aux = -delta / PHI_SCALE
        stats["phi_mean"] = phi.detach().mean()
        for i, name in enumerate(COMPONENTS):
            stats[f"phi_{name}"] = components[..., i].detach().mean()
        stats["delta_phi"] = delta.detach()
        stats["aux_loss"] = aux.detach()
        for name, w in zip(COMPONENTS, self.phi_weights.weights().detach(), strict=True):
            stats[f"phi_weight_{name}"] = w
        if self.memory is None:
            return aux, stats, None
        ends = mid[:, C - 1 : n * C : C].detach()  # (B, n, D): each chunk's last state
        means = mid[:, : n * C].detach().reshape(B, n, C, D).mean(2)  # (B, n, D)
        phi = phi.detach().float()  # (B, n)
        if rows is None:  # the shared memory: one group of every row's chunks
            ends, means, phi = (
                ends.reshape(1, B * n, D),
                means.reshape(1, B * n, D),
                phi.view(1, -1),
            )
        candidates = MemoryCandidates(ends, means, phi, slot_mass, rows)
        return aux, stats, candidates

    def _check_input(self, idx: Tensor, targets: Tensor | None) -> None:
        """Shape and dtype checks only (token values would need a host sync)."""
        if (
            not isinstance(idx, Tensor)
            or idx.dim() != 2
            or idx.dtype not in (torch.long, torch.int)
        ):
            raise ValueError(
                "idx must be a 2-D integer tensor of token ids (batch, time), got "
                f"{getattr(idx, 'dtype', type(idx))} of shape {tuple(getattr(idx, 'shape', ()))}"
            )
        T = idx.shape[1]
        if not 1 <= T <= self.config.block_size:
            raise ValueError(
                f"sequence length {T} must be between 1 and model.block_size="
                f"{self.config.block_size}; crop or split the input"
            )
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}"
            )

    # ------------------------------------------------------------------ memory

    @torch.no_grad()
    def write_memory(self, candidates: MemoryCandidates | None) -> dict[str, Tensor]:
        """Write one forward pass's candidates (after the pass); {} when memory is off or None.

        The statistics (``candidates``, ``writes``, ``evictions``, ``memory_accepted_fraction``,
        ``memory_written_fraction``, ``memory_evicted_age``, the ``memory_{accepted,rejected}
        _phi_p{10,50,90}`` percentiles, ``memory_utilisation``, ``stored_phi_mean``,
        ``candidate_phi_mean``, ``threshold``; see ``IITGuidedMemory.write``) are 0-dim tensors
        on the model's device, NaN where there was nothing to measure (no evictions, no
        rejected candidates): reading them is left to the caller, so a training step needs no
        host synchronisation here."""
        if self.memory is None or candidates is None:
            return {}
        return self.memory.write(candidates, self.config.phi_priority_weight)

    def reset_memory(self, rows: int | None = None) -> None:
        """Empty the memory. ``rows``: with ``memory_scope: stream``, one memory for each of
        that many streams (batch rows); the shared memory ignores it (one memory for all)."""
        if self.memory is not None:
            self.memory.reset(rows)

    def clear_memory_rows(self, rows: Tensor) -> None:
        """Empty the stream memories where ``rows`` (R,) bool is True (a stream starts a new
        document); no host synchronisation. The shared memory has one row."""
        if self.memory is not None:
            self.memory.clear(rows)

    @contextlib.contextmanager
    def memory_reads_disabled(self) -> Iterator[None]:
        """Forward passes inside the block read nothing from the memory."""
        previous, self._reads_enabled = self._reads_enabled, False
        try:
            yield
        finally:
            self._reads_enabled = previous

    def memory_stats(self) -> dict[str, float]:
        """memory_utilisation, stored_phi_mean, threshold; {} without memory."""
        return {} if self.memory is None else self.memory.stats()

    @torch.no_grad()
    def iit_stats(self) -> dict[str, float]:
        """The learned phi weights and the threshold, as floats; {} in the ablation."""
        out: dict[str, float] = {}
        if self.phi_weights is not None:
            for name, w in zip(COMPONENTS, self.phi_weights.weights().tolist(), strict=True):
                out[f"phi_weight_{name}"] = w
        if self.memory is not None:
            out["threshold"] = float(self.memory.threshold)
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens; returns (B, T + n).

        temperature 0 is greedy; top_k (None or 0 disables), top_p (None or 1 disables) and the
        CTRL repetition penalty (logits of tokens already in the row are divided by it when
        positive, multiplied when negative) shape the distribution. A row that emits
        eos_token_id is padded with it; generation stops early when every row has. Contexts
        longer than block_size are cropped to the last block_size tokens. With use_cache, keys
        and values are cached while the sequence fits in block_size; beyond it every step
        recomputes the cropped window, because positions are absolute and a shifted window
        invalidates the cache. The model runs in eval mode (deterministic); the memory is read
        but not written. With stream memories, row b reads memory row b (its own past): the
        memory needs at least B rows (``reset_memory(rows=B)`` gives B empty ones).
        """
        self._check_generate_args(
            idx, max_new_tokens, temperature, top_k, top_p, repetition_penalty, eos_token_id
        )
        was_training = self.training
        self.eval()
        # generation writes no memory: its slots are projected once, not at every step
        frozen = self.memory.frozen() if self.memory is not None else contextlib.nullcontext()
        try:
            with frozen:
                finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
                caches: list[LayerCache] | None = None
                for _ in range(max_new_tokens):
                    if use_cache and idx.shape[1] <= self.config.block_size:
                        if caches is None:  # prefill with the whole prompt
                            caches = [
                                LayerCache(self.config.block_size)
                                for _ in range(self.config.n_layer)
                            ]
                            logits = self._decode(idx, 0, caches)
                        else:
                            logits = self._decode(idx[:, -1:], idx.shape[1] - 1, caches)
                    else:
                        caches = None
                        logits = self._decode(idx[:, -self.config.block_size :], 0, None)
                    logits = self._penalise(logits.float(), idx, repetition_penalty)  # (B, V)
                    nxt = self._sample(logits, temperature, top_k, top_p, generator)  # (B,)
                    if eos_token_id is not None:
                        nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                        finished = finished | (nxt == eos_token_id)
                    idx = torch.cat([idx, nxt[:, None]], dim=1)
                    if eos_token_id is not None and bool(finished.all()):
                        break
        finally:
            self.train(was_training)
        return idx

    def _decode(self, tokens: Tensor, start: int, caches: list[LayerCache] | None) -> Tensor:
        """Logits (B, V) of the last of ``tokens``, which sit at positions start.. onward."""
        x = self._embed(tokens, start)  # (B, T, D)
        rows = None if self.memory is None else self.memory.read_rows(tokens.shape[0], None)
        for i, block in enumerate(self.transformer.h):
            if i == self.memory_layer:
                x, _ = self._memory_point(x, rows)
            x, _, _ = block(x, None if caches is None else caches[i])
        return self.lm_head(self.transformer.ln_f(x[:, -1]))  # (B, V)

    @staticmethod
    def _penalise(logits: Tensor, idx: Tensor, penalty: float) -> Tensor:
        if penalty == 1.0:
            return logits
        seen = logits.gather(1, idx)  # (B, T)
        seen = torch.where(seen > 0, seen / penalty, seen * penalty)
        return logits.scatter(1, idx, seen)

    @staticmethod
    def _sample(
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p is not None and top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)  # (B, V)
            probs = ordered.softmax(-1)
            # drop a token when the tokens ranked above it already hold top_p of the mass
            drop = probs.cumsum(-1) - probs > top_p
            logits = logits.scatter(1, order, ordered.masked_fill(drop, -math.inf))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _check_generate_args(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float,
        eos_token_id: int | None,
    ) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be a (batch, time) tensor with time >= 1, got {idx!r}")
        checks = [
            (max_new_tokens >= 0, "max_new_tokens", max_new_tokens, "must be >= 0"),
            (temperature >= 0, "temperature", temperature, "must be >= 0 (0: greedy)"),
            (top_k is None or top_k >= 0, "top_k", top_k, "must be None or >= 0 (0 disables)"),
            (top_p is None or 0 < top_p <= 1, "top_p", top_p, "must be None or in (0, 1]"),
            (repetition_penalty > 0, "repetition_penalty", repetition_penalty, "must be > 0"),
            (
                eos_token_id is None or 0 <= eos_token_id < self.config.vocab_size,
                "eos_token_id",
                eos_token_id,
                f"must be None or a token id below vocab_size={self.config.vocab_size}",
            ),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise ValueError(f"generate: {name}={value!r} {allowed}")

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> None:
        """Write ``path/model.safetensors`` (weights and memory) and ``path/config.json``."""
        with atomic_dir(path) as tmp:
            self._write_checkpoint(tmp)

    def _write_checkpoint(self, directory: Path) -> None:
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        data = safetensors_bytes(tensors, metadata={"format": "pt"})
        with (directory / WEIGHTS_FILE).open("wb") as f:  # a Python write: a full disk is OSError
            f.write(data)
        write_json(directory / CONFIG_FILE, self.config.to_dict())

    def _save_pretrained(self, save_directory: Path) -> None:
        """``save_pretrained``'s files: the checkpoint ``save`` writes, in ``save_directory``."""
        self._write_checkpoint(Path(save_directory))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **model_kwargs: object,
    ) -> Infinito:
        """``from_pretrained``: a local directory or a Hub repo's two files, loaded strictly by
        ``from_checkpoint``, in eval mode (the mixin's convention)."""
        model_kwargs.pop("config", None)  # the mixin's lenient parse; from_checkpoint re-reads it
        if model_kwargs:
            raise TypeError(
                f"Infinito.from_pretrained got unexpected arguments {sorted(model_kwargs)}; the "
                f"model is described by its {CONFIG_FILE}"
            )
        path = Path(model_id)
        if not path.is_dir():
            path = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                    allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
                )
            )
        return cls.from_checkpoint(path, map_location=map_location).eval()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> Infinito:
        """Load a directory written by ``save``, strictly: a missing or unexpected tensor fails."""
        path = Path(path)
        config = checkpoint_config(path)
        try:
            state = load_file(str(path / WEIGHTS_FILE), device=str(map_location))
        except SafetensorError as e:
            raise CheckpointError(
                _damaged(path / WEIGHTS_FILE, f"not a readable safetensors file: {e}")
            ) from e
        with torch.device("meta"):  # no initialisation work: every tensor is loaded below
            model = cls(config)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: missing tensors "
                f"{missing or 'none'}, unexpected tensors {unexpected or 'none'}"
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:  # shapes that are not the config's
            reason = str(e).splitlines()[-1].strip()
            raise CheckpointError(
                f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE} ({reason}); "
                f"restore the pair with `dvc checkout {path}` if DVC tracks it, or train "
                "again (`dvc repro -f train`)"
            ) from e
        return model

    # ------------------------------------------------------------------ accounting

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_breakdown(self) -> dict[str, int]:
        """Parameters per part; ``total`` equals ``num_params()``."""
        groups = {
            "token_embedding": "transformer.wte.",
            "position_embedding": "transformer.wpe.",
            "attention": ".attn.",
            "mlp": ".mlp.",
            "layer_norms": ".ln_",
            "lm_head": "lm_head.",
            "memory": "memory.",
            "phi_weights": "phi_weights.",
        }
        out = dict.fromkeys(groups, 0)
        for name, p in self.named_parameters():
            group = next(g for g, key in groups.items() if key in f".{name}")
            out[group] += p.numel()
        out["total"] = sum(out.values())
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token, PaLM's estimate (appendix B):
        6 N + 12 L D T, N the weights used in matrix products (all but the embeddings), plus
        12 S D for the memory reads over S slots."""
        cfg = self.config
        n = self.num_params() - self.transformer.wte.weight.numel()
        n -= self.transformer.wpe.weight.numel()
        flops = 6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len
        if self.memory is not None:
            flops += 12 * cfg.memory_slots * cfg.d_model
        return float(flops)


def main(argv: list[str] | None = None) -> int:
    """Print the parameter breakdown of the model that params.yaml describes."""
    parser = argparse.ArgumentParser(prog="python -m infinito.model", description=main.__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    config = load_params(args.params).model
    with torch.device("meta"):
        model = Infinito(config)
    for name, count in model.param_breakdown().items():
        print(f"{name:<20} {count:>12,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
