"""Decoding for the server: many sequences of different lengths advanced one token per step.

``Infinito.generate`` decodes a rectangular batch: every row has the same length and the same
sampling settings. A server's requests arrive at different times with different prompts and
settings, so the engine keeps one ``Sequence`` per request, with its own KV cache
(``infinito.model.LayerCache``), token history, sampling settings and seeded generator, and
``step`` advances any set of them together:

- the matrix products (QKV, attention output, MLP, the memory read's projections, the output
  head) run once on all sequences stacked as (B, 1, D): this is where batching pays, because a
  CPU decode step is bound by reading the weights, which are now read once for B tokens;
- attention runs per sequence over its own cache (each has its own length), exactly as
  ``Infinito.generate`` computes it for a single row;
- sampling runs per sequence with the model's rules (``Infinito._penalise`` and the filters of
  ``Infinito._sample``; the final draw is by inverse CDF, see ``sample``) and the sequence's
  seeded generator.

The forward pass mirrors ``Infinito._decode`` (embedding, blocks, the memory read at the middle
layer, final norm, head); a test checks that a sequence decoded here gives the same greedy tokens
and logits as ``Infinito.generate``, so a change to the model that this module misses fails
there. A batch changes a sequence's numbers only by float rounding in the stacked matrix
products (see docs/serve.md); with the int8 variant the rows are quantized one by one and a
sequence's result is bit-for-bit the same in any batch.

Memory: the engine never writes the IIT memory. It is frozen (``IITGuidedMemory.frozen``) for the
engine's life, so every request reads the same memory: the empty one by default (``reset``, as
the generate-samples stage does before each prompt), or the checkpoint's (``checkpoint``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from infinito.model import Infinito, LayerCache

MEMORY_MODES = ("reset", "checkpoint")


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings, already validated (see the API's request model)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None  # None: off
    top_p: float | None = None  # None: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int = 0


@dataclass
class Sequence:
    """A request inside the engine: its tokens so far, caches and random generator."""

    ids: Tensor  # (1, T) prompt + generated tokens, on the model's device
    sampling: Sampling
    generator: torch.Generator
    caches: list[LayerCache]
    generated: int = 0
    last: Tensor = field(default_factory=lambda: torch.empty(0))  # (1,) the newest token

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


class Engine:
    """Owns the model; ``start`` prefills a prompt, ``step`` advances running sequences."""

    def __init__(self, model: Infinito, memory: str = "reset") -> None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not one of {', '.join(MEMORY_MODES)}")
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        if memory == "reset":
            model.reset_memory()
        self._frozen = contextlib.ExitStack()
        if model.memory is not None:  # the memory is read-only while serving
            self._frozen.enter_context(model.memory.frozen())

    def close(self) -> None:
        self._frozen.close()

    def can_extend(self, seq: Sequence) -> bool:
        """A sequence of T tokens gets a next token while its last one has a position (< block)."""
        return seq.length <= self.config.block_size

    @torch.no_grad()
    def start(self, prompt_ids: list[int], sampling: Sampling) -> Sequence:
        """Prefill ``prompt_ids`` (1..block_size tokens) and sample the first new token."""
        if not 1 <= len(prompt_ids) <= self.config.block_size:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens; 1..{self.config.block_size} fit the model"
            )
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        seq = Sequence(
            ids=ids,
            sampling=sampling,
            generator=torch.Generator(device=self.device).manual_seed(sampling.seed),
            caches=[LayerCache(self.config.block_size) for _ in range(self.config.n_layer)],
        )
        logits = self.model._decode(ids, 0, seq.caches)  # (1, V), as generate's prefill
        self._append(seq, self._pick(seq, logits))
        return seq

    @torch.no_grad()
    def step(self, seqs: list[Sequence]) -> None:
        """Feed each sequence's newest token and append one sampled token to each."""
        if not seqs:
            return
        if not all(self.can_extend(s) for s in seqs):
            raise ValueError("step: a sequence has no position left (check can_extend first)")
        logits = self._forward(seqs)  # (B, V)
        for b, seq in enumerate(seqs):
            self._append(seq, self._pick(seq, logits[b : b + 1]))

    def _forward(self, seqs: list[Sequence]) -> Tensor:
        """Logits (B, V) after each sequence's newest token: ``Infinito._decode``, ragged."""
        model = self.model
        tokens = torch.cat([s.last for s in seqs])[:, None]  # (B, 1)
        positions = torch.tensor([s.length - 1 for s in seqs], device=self.device)  # (B,)
        wte, wpe = model.transformer.wte, model.transformer.wpe
        x = wte(tokens) + wpe(positions)[:, None]  # (B, 1, D)
        rows = None  # the shared memory; stream memories: every request reads row 0, as prefill
        if model.memory is not None and model.memory.stream:
            rows = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        for i, block in enumerate(model.transformer.h):
            if i == model.memory_layer:
                x, _ = model._memory_point(x, rows)
            x = self._block(block, x, [s.caches[i] for s in seqs])
        return model.lm_head(model.transformer.ln_f(x[:, -1]))  # (B, V)

    @staticmethod
    def _block(block: torch.nn.Module, x: Tensor, caches: list[LayerCache]) -> Tensor:
        """One pre-norm block for B one-token rows, each attending over its own cache."""
        attn = block.attn
        B, T, D = x.shape  # T == 1
        H = attn.n_head
        q, k, v = attn.c_attn(block.ln_1(x)).split(D, dim=2)
        q = q.view(B, T, H, D // H).transpose(1, 2)  # (B, H, 1, Dh)
        k = k.view(B, T, H, D // H).transpose(1, 2)  # (B, H, 1, Dh)
        v = v.view(B, T, H, D // H).transpose(1, 2)  # (B, H, 1, Dh)
        rows = []
        for b, cache in enumerate(caches):
            k_all, v_all = cache.update(k[b : b + 1], v[b : b + 1])  # (1, H, T_b, Dh)
            rows.append(F.scaled_dot_product_attention(q[b : b + 1], k_all, v_all))
        y = torch.cat(rows).transpose(1, 2).contiguous().view(B, T, D)  # (B, 1, D)
        x = x + attn.resid_drop(attn.c_proj(y))
        return x + block.mlp(block.ln_2(x))

    def _pick(self, seq: Sequence, logits: Tensor) -> Tensor:
        """The next token (1,) under the sequence's settings; see ``sample``."""
        s = seq.sampling
        logits = Infinito._penalise(logits.float(), seq.ids, s.repetition_penalty)
        return sample(logits, s.temperature, s.top_k, s.top_p, seq.generator)

    @staticmethod
    def _append(seq: Sequence, token: Tensor) -> None:
        seq.ids = torch.cat([seq.ids, token[:, None]], dim=1)
        seq.last = token
        seq.generated += 1


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
) -> Tensor:
    """Draw a token from logits (1, V) by ``Infinito.generate``'s rules (greedy at temperature
    0, then top-k, then nucleus top-p), by inverse CDF.

    ``torch.multinomial``, which ``Infinito.generate`` uses, takes about a millisecond per row
    over GPT-2's 50,257 tokens on a CPU core, as long as a whole decode step of a small model;
    one uniform number and a binary search over the cumulative sum take a twentieth of that.
    The distribution is the same, the random stream is not: a seed gives the same text on every
    run of the server, alone or batched, but not the same text as ``infinito generate``.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (1, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)  # (1, V)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the tokens above already hold top_p
        logits = logits.scatter(1, order, ordered.masked_fill(drop, -math.inf))
    cdf = logits.softmax(-1).double().cumsum(-1)  # (1, V)
    # u in (0, 1] scaled to the total: the first index whose CDF reaches it has mass > 0
    u = 1.0 - torch.rand((1, 1), generator=generator, device=logits.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1)
