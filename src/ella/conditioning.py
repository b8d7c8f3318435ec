"""The per-timestep condition table and the hook that feeds it to an unmodified UNet.

The official wrapper replaces ``pipe.unet`` by a proxy that runs the connector at every UNet
call; that breaks ``load_lora_weights``, IP-Adapter and ControlNet, and recomputes the same
connector outputs once per step. Here instead:

1. the LLM features of all distinct prompts (positive and negative) are stacked as the table's
   *rows*;
2. the connector runs once for every (scheduler timestep, row) pair in one batched call
   (chunked only for very large tables);
3. the pipeline hands the diffusers loop a *placeholder* ``prompt_embeds`` of shape ``[N, 1, 1]``
   whose value is the table row of each sample; whatever the loop does with it (CFG concat,
   ``num_images_per_prompt`` repeats) keeps the row ids aligned with the latents;
4. a forward pre-hook on the UNet (and any ControlNet) swaps the placeholder for the table's
   ``[N, tokens, width]`` condition of the timestep being called.

``pipe.unet`` stays a real ``UNet2DConditionModel`` throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .text import TextFeatures

#: Rows x timesteps per connector call; bounds memory for huge batches (50 steps x 20 rows fits).
MAX_ROWS_PER_CALL = 1024


class ConditionTable:
    """Connector outputs for every row (distinct prompt) at every timestep, computed lazily once.

    ``timesteps`` is a callable returning the schedule (the scheduler's ``timesteps`` are only
    known once the pipeline has called ``set_timesteps``). A timestep outside it — a custom loop,
    a fractional timestep — is computed on demand and cached, so lookups never fail.
    """

    def __init__(
        self,
        connector: nn.Module,
        features: TextFeatures,
        timesteps: Callable[[], Iterable[float]] | None = None,
    ):
        self.connector = connector
        param = next(connector.parameters())
        self.states = features.hidden_states.to(param.device, param.dtype)
        self.mask = None if features.attention_mask is None else features.attention_mask.to(param.device)
        self._timesteps = timesteps
        self._cache: dict[float, torch.Tensor] = {}

    @property
    def rows(self) -> int:
        return self.states.shape[0]

    @torch.no_grad()
    def compute(self, timesteps: Iterable[float]) -> None:
        """Run the connector for all rows at all ``timesteps`` not yet cached, batched."""
        todo = sorted({float(t) for t in timesteps} - set(self._cache), reverse=True)
        per_call = max(1, MAX_ROWS_PER_CALL // self.rows)
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            n = len(chunk)
            t = torch.tensor(chunk, device=self.states.device).repeat_interleave(self.rows)
            mask = None if self.mask is None else self.mask.repeat(n, 1)
            out = self.connector(self.states.repeat(n, 1, 1), t, attention_mask=mask)
            for i, key in enumerate(chunk):
                self._cache[key] = out[i * self.rows : (i + 1) * self.rows]

    def condition(self, timestep: torch.Tensor | float, rows: torch.Tensor) -> torch.Tensor:
        """The ``[len(rows), tokens, width]`` condition for one timestep."""
        if not self._cache and self._timesteps is not None:
            self.compute(self._timesteps())
        key = float(timestep)
        if key not in self._cache:
            self.compute([key])
        return self._cache[key][rows]

    def encoder_attention_mask(self, rows: torch.Tensor) -> torch.Tensor | None:
        """For connectors whose output follows the text (MLP variant), the text mask per sample."""
        if self.mask is None or not getattr(self.connector, "output_follows_text", False):
            return None
        return self.mask[rows]


def placeholder_embeds(rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``prompt_embeds`` stand-ins carrying the table row of each sample as their single value."""
    return rows.to(device=device, dtype=torch.float32).view(-1, 1, 1)


def _is_placeholder(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1:] == (1, 1)


@contextlib.contextmanager
def feed_conditions(modules: Iterable[nn.Module | None], table: Callable[[], ConditionTable | None]) -> Iterator[None]:
    """While active, calls of ``modules`` (UNet, ControlNet: ``(sample, timestep, encoder_hidden_states,
    ...)``) with placeholder embeds receive the condition of their own timestep from ``table()``
    (a getter, because the pipeline builds the table only once it has encoded the prompts)."""

    def pre_hook(module, args, kwargs):
        args = list(args)
        in_args = len(args) > 2
        ehs = args[2] if in_args else kwargs.get("encoder_hidden_states")
        current = table()
        if current is None or not _is_placeholder(ehs):
            return None  # somebody else's call with real embeddings: leave it alone
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        rows = ehs[:, 0, 0].round().long()
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            # per-sample timesteps: look each sample up on its own
            cond = torch.cat([current.condition(ti, rows[i : i + 1]) for i, ti in enumerate(t)])
        else:
            cond = current.condition(t[0], rows)
        if in_args:
            args[2] = cond
        else:
            kwargs["encoder_hidden_states"] = cond
        mask = current.encoder_attention_mask(rows)
        if mask is not None:
            kwargs["encoder_attention_mask"] = mask
        return tuple(args), kwargs

    # Under ``unet.compile()`` the hooks run inside the compiled call: keep the table lookup (a
    # Python dict keyed by float(t)) out of the graph, or dynamo recompiles for every timestep.
    pre_hook = torch.compiler.disable(pre_hook)
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules if m is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
