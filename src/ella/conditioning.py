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
from dataclasses import dataclass

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

    The per-step lookup is built to cost the denoising loop nothing: when the loop's timestep is
    an element of the schedule tensor (diffusers iterates over it), its position is read from the
    tensor's storage offset instead of ``float(t)``, which would wait for the GPU at every step;
    and each placeholder batch gets its rows gathered once for all timesteps, so a step's
    condition is a view, launching no kernel.
    """

    def __init__(
        self,
        connector: nn.Module,
        features: TextFeatures,
        timesteps: Callable[[], Iterable[float] | torch.Tensor] | None = None,
        clip: ClipPart | None = None,
        pooled: bool = False,
    ):
        self.connector = connector
        param = next(connector.parameters())
        self.states = features.hidden_states.to(param.device, param.dtype)
        self.mask = None if features.attention_mask is None else features.attention_mask.to(param.device)
        self.clip = clip
        # SDXL-style UNets also take a pooled text embedding: the connector's pooling head over its own
        # tokens at the same timestep (as trained in ella.train), kept beside the token table.
        self.with_pooled = pooled
        self._pooled: dict[float, torch.Tensor] = {}  # timestep -> [rows, pooled_dim]
        self._schedule_fn = timesteps
        self._schedule: torch.Tensor | None = None  # the tensor the loop iterates over
        self._stack: torch.Tensor | None = None  # [unique timesteps, rows, tokens, width]
        self._index: dict[float, int] = {}  # timestep value -> position in _stack
        self._positions: list[int] = []  # schedule position -> position in _stack
        self._extra: dict[float, torch.Tensor] = {}  # off-schedule timesteps
        self._gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rows(self) -> int:
        return self.states.shape[0]

    @torch.no_grad()
    def run(self, timesteps: list[float]) -> torch.Tensor:
        """The connector for all rows at ``timesteps``: ``[len(timesteps), rows, tokens, width]``, batched."""
        per_call = max(1, MAX_ROWS_PER_CALL // self.rows)
        outs = []
        for start in range(0, len(timesteps), per_call):
            chunk = timesteps[start : start + per_call]
            n = len(chunk)
            t = torch.tensor(chunk, device=self.states.device).repeat_interleave(self.rows)
            mask = None if self.mask is None else self.mask.repeat(n, 1)
            out = self.connector(self.states.repeat(n, 1, 1), t, attention_mask=mask)
            if self.with_pooled:
                pooled = self.connector.pool(out, mask).view(n, self.rows, -1)
                self._pooled.update({key: pooled[i] for i, key in enumerate(chunk)})
            out = out.view(n, self.rows, *out.shape[1:])
            outs.append(out if self.clip is None else self.clip.join(out))
        return torch.cat(outs)

    def precompute(self) -> None:
        """Run the connector for the whole schedule (once; later calls return at once)."""
        if self._stack is not None:
            return
        schedule = self._schedule_fn() if self._schedule_fn is not None else []
        if isinstance(schedule, torch.Tensor):
            self._schedule = schedule
            keys = [float(x) for x in schedule.reshape(-1).tolist()]  # one device sync per call
        else:
            keys = [float(x) for x in schedule]
        unique = list(dict.fromkeys(keys))
        self._index = {k: i for i, k in enumerate(unique)}
        self._positions = [self._index[k] for k in keys]
        self._stack = self.run(unique) if unique else None

    def _position(self, timestep: torch.Tensor | float) -> int | None:
        """Position of ``timestep`` in the table, without a device sync for schedule elements."""
        s = self._schedule
        if (
            isinstance(timestep, torch.Tensor)
            and s is not None
            and timestep.ndim == 0
            and s.ndim == 1
            and s.stride(0) == 1
            and timestep.device == s.device
            and timestep.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
        ):
            i = timestep.storage_offset() - s.storage_offset()
            if 0 <= i < len(self._positions):
                return self._positions[i]
        return self._index.get(float(timestep))

    def _off_schedule(self, timestep: torch.Tensor | float) -> torch.Tensor:
        key = float(timestep)
        if key not in self._extra:
            self._extra[key] = self.run([key])[0]
        return self._extra[key]

    def condition(self, timestep: torch.Tensor | float, rows: torch.Tensor) -> torch.Tensor:
        """The ``[len(rows), tokens, width]`` condition for one timestep."""
        self.precompute()
        pos = self._position(timestep)
        table = self._off_schedule(timestep) if pos is None else self._stack[pos]
        return table[rows]

    def condition_for_placeholder(self, timestep: torch.Tensor | float, placeholder: torch.Tensor) -> torch.Tensor:
        """:meth:`condition` for the rows a placeholder batch names, gathered once per placeholder."""
        self.precompute()
        pos = self._position(timestep)
        if pos is None:
            return self._off_schedule(timestep)[placeholder_rows(placeholder)]
        key = (placeholder.data_ptr(), tuple(placeholder.shape), placeholder.stride())
        if key not in self._gathered:
            # keeping the placeholder referenced keeps its address from being reused by another tensor
            self._gathered[key] = (placeholder, self._stack[:, placeholder_rows(placeholder)])
        return self._gathered[key][1][pos]

    def pooled(self, timestep: torch.Tensor | float, rows: torch.Tensor) -> torch.Tensor:
        """The ``[len(rows), pooled_dim]`` pooled embedding for one timestep (SDXL's ``text_embeds``)."""
        self.precompute()
        key = float(timestep)
        if key not in self._pooled:
            self._off_schedule(timestep)  # computes (and caches) the pooled embedding too
        return self._pooled[key][rows]

    def encoder_attention_mask(self, placeholder: torch.Tensor) -> torch.Tensor | None:
        """For connectors whose output follows the text (MLP variant), the text mask per sample."""
        if self.mask is None or not getattr(self.connector, "output_follows_text", False):
            return None  # checked first: the common case costs the step no kernel
        mask = self.mask[placeholder_rows(placeholder)]
        return mask if self.clip is None else self.clip.join_mask(mask)


@dataclass
class ClipPart:
    """The base's own CLIP tokens, joined to ELLA's in ``ella+clip`` mode (the authors' fix for trigger words).

    LoRA trigger words and textual-inversion tokens only mean something to the CLIP text encoder
    they were trained with; ``ella+clip`` gives the UNet CLIP's 77 tokens *and* ELLA's 64 (141 in
    all), so those still work while the LLM carries the dense description.

    Order: CLIP first by default. Cross-attention has no positional encoding over its keys, so the
    order does not change the UNet's output (tested); it is configurable for tools that slice the
    condition by position. ``clip_scale``/``ella_scale`` multiply each part's tokens.
    """

    embeds: torch.Tensor  # [rows, 77, width]: CLIP's last hidden states of every table row's text
    clip_first: bool = True
    clip_scale: float = 1.0
    ella_scale: float = 1.0

    def join(self, ella: torch.Tensor) -> torch.Tensor:
        """``ella`` ``[n, rows, tokens, width]`` -> ``[n, rows, 77 + tokens, width]``."""
        clip = self.embeds.to(ella.dtype).unsqueeze(0).expand(ella.shape[0], -1, -1, -1)
        clip = clip * self.clip_scale if self.clip_scale != 1.0 else clip
        ella = ella * self.ella_scale if self.ella_scale != 1.0 else ella
        return torch.cat((clip, ella) if self.clip_first else (ella, clip), dim=2)

    def join_mask(self, mask: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(mask.shape[0], self.embeds.shape[1], dtype=mask.dtype, device=mask.device)
        return torch.cat((ones, mask) if self.clip_first else (mask, ones), dim=1)


def placeholder_embeds(rows: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``prompt_embeds`` stand-ins carrying the table row of each sample as their single value."""
    return rows.to(device=device, dtype=torch.float32).view(-1, 1, 1)


def placeholder_rows(placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder[:, 0, 0].round().long()


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
        per_sample = None  # a batch whose samples sit at different timesteps: each looked up on its own
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
            t = timestep.reshape(-1)
            if bool((t == t[0]).all()):
                timestep = t[0]
            else:
                per_sample = t
        elif isinstance(timestep, torch.Tensor) and timestep.ndim:
            timestep = timestep.reshape(())  # a view: keeps the storage offset _position reads
        if per_sample is not None:
            rows = placeholder_rows(ehs)
            cond = torch.cat([current.condition(ti, rows[i : i + 1]) for i, ti in enumerate(per_sample)])
        else:
            cond = current.condition_for_placeholder(timestep, ehs)
        if in_args:
            args[2] = cond
        else:
            kwargs["encoder_hidden_states"] = cond
        added = kwargs.get("added_cond_kwargs")
        if current.with_pooled and added and "text_embeds" in added:
            if per_sample is not None:
                pooled = torch.cat([current.pooled(ti, rows[i : i + 1]) for i, ti in enumerate(per_sample)])
            else:  # (keyed by float(t): one device sync per step, SDXL only)
                pooled = current.pooled(timestep, placeholder_rows(ehs))
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled}
        mask = current.encoder_attention_mask(ehs)
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
