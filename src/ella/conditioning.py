"""The per-timestep condition table and the feed that hands it to an unmodified UNet.

The official wrapper replaces ``pipe.unet`` by a proxy that runs the connector at every UNet
call; that breaks ``load_lora_weights``, IP-Adapter and ControlNet, and recomputes the same
connector outputs once per step. Here instead:

1. the LLM features of all distinct prompts (positive and negative) are stacked as the table's
   *rows*;
2. the connector runs once for every (scheduler timestep, row) pair in one batched call
   (chunked only for very large tables): :class:`ConditionTable`;
3. the pipeline hands the diffusers loop a *placeholder* ``prompt_embeds`` of shape ``[N, 1, 1]``
   whose value is the table row of each sample; whatever the loop does with it (CFG concat,
   ``num_images_per_prompt`` repeats) keeps the row ids aligned with the latents;
4. a forward pre-hook on the UNet (and any ControlNet) swaps the placeholder for the table's
   ``[N, tokens, width]`` condition of the timestep being called: :class:`ConditionFeed`.

``pipe.unet`` stays a real ``UNet2DConditionModel`` throughout.

Prompt editing (``[a red square:a blue circle:0.5]``, ``[a|b]``) makes the condition depend on the step
as well: the placeholder then carries a *slot* (one per prompt given), and a ``schedule`` says which row
(distinct prompt text) each slot reads at each step. Without one, slot ``i`` reads row ``i`` at every step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .devices import compute_device
from .errors import EllaError
from .text import TextFeatures

#: Rows x timesteps per connector call; bounds memory for huge batches (50 steps x 20 rows fits).
MAX_ROWS_PER_CALL = 1024


class ConditionTable:
    """Connector outputs for every row (distinct prompt) at every scheduler timestep, computed once.

    ``timesteps`` is a callable returning the schedule: the scheduler's ``timesteps`` are only known
    once the pipeline has called ``set_timesteps``, so the table is filled at its first lookup.

    A lookup finds the timestep's position in the table in one of two ways:

    * **by address**, for an element of the schedule tensor (what every diffusers loop hands the
      UNet: ``for t in timesteps``, img2img's ``timesteps[k:]`` slice, ``t.expand(batch)``). The
      table keeps the schedule tensor alive, so no other tensor can occupy its elements' memory; a
      0-d tensor of the schedule's device and dtype at one of those addresses reads the same bytes,
      hence the same value. This avoids ``float(t)``, which would wait for the GPU at every step.
    * **by value** (``float(t)``, one device sync) for anything else: a copy, a Python number.
      A value that is not on the schedule at all (a custom loop's own timesteps) is computed on the
      spot for that call.

    What is deliberately *not* cached, because it does not pay: a step's rows are gathered from the
    table at every UNet call (the row ids read off the placeholder, then one gather: three small
    kernels and tens of µs of host time, about 0.1% of an SD1.5 UNet step; numbers in
    benchmarks/RESULTS.md), and an off-schedule timestep is recomputed at each call that asks for it
    (no diffusers SD/SDXL pipeline asks for one; a custom loop then pays the connector per call, as
    the official wrapper does at every step).
    """

    def __init__(
        self,
        connector: nn.Module,
        features: TextFeatures,
        timesteps: Callable[[], Iterable[float] | torch.Tensor] | None = None,
        clip: ClipPart | None = None,
        pooled: bool = False,
        schedule: Callable[[int], SlotRows] | None = None,
        run_from: Callable[[], int | None] | None = None,
    ):
        self.connector = connector
        self.states = features.hidden_states.to(dtype=next(connector.parameters()).dtype)
        self.mask = features.attention_mask
        self.weights = features.token_weights
        self.clip = clip
        # SDXL-style UNets also take a pooled text embedding: the connector's pooling head over its own
        # tokens at the same timestep (as trained in ella.train), kept beside the token table.
        self.with_pooled = pooled
        self._schedule_fn = timesteps
        # ``schedule(steps)``: per slot and step, the feature row (and CLIP row) to read; ``run_from()``: where
        # the loop starts in the schedule (img2img's begin index), so "step 1" is the first step that runs.
        self._slot_fn = schedule
        self._run_from = run_from
        self._filled = False
        self._schedule: torch.Tensor | None = None  # held so that its element addresses stay its own
        self._by_address: dict[int, int] = {}  # data_ptr of a schedule element -> table position
        self._by_value: dict[float, int] = {}  # timestep value -> table position
        self._run_values: list[float] = []  # the distinct timesteps the loop runs, in order: step 1, 2, ...
        self._slot_rows: SlotRows | None = None  # [slots, steps] feature rows (and CLIP rows) per step
        self._step_of: list[int] = []  # table position -> step index (0-based) into _slot_rows
        self._tokens: torch.Tensor | None = None  # [unique timesteps, slots, tokens, width]
        self._pooled: torch.Tensor | None = None  # [unique timesteps, slots, pooled_dim]

    @property
    def rows(self) -> int:
        """Distinct prompt texts (the LLM features' batch)."""
        return self.states.shape[0]

    @property
    def slots(self) -> int:
        """What a placeholder indexes: one per prompt given (equal to the rows without a schedule)."""
        return self.rows if self._slot_rows is None else self._slot_rows.llm.shape[0]

    def rows_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature rows and CLIP rows of every slot at ``step`` (0-based); identity without a schedule."""
        if self._slot_rows is None:
            rows = torch.arange(self.rows)
            return rows, rows
        llm, clip = self._slot_rows.llm, self._slot_rows.clip
        step = min(step, llm.shape[1] - 1)
        return llm[:, step], (llm if clip is None else clip)[:, step]

    @torch.no_grad()
    def run(self, timesteps: list[float], steps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The connector for all slots at ``timesteps`` (each at its ``steps`` entry), in one batched call
        (chunked past MAX_ROWS_PER_CALL).

        Returns tokens ``[len(timesteps), slots, tokens, width]`` (CLIP's joined in ``ella+clip`` mode)
        and, with a pooling head, the pooled embedding ``[len(timesteps), slots, pooled_dim]``, else None.
        """
        steps = steps if steps is not None else [0] * len(timesteps)
        slots = self.slots
        per_call = max(1, MAX_ROWS_PER_CALL // slots)
        tokens, pooled = [], []
        for start in range(0, len(timesteps), per_call):
            chunk = timesteps[start : start + per_call]
            n = len(chunk)
            picks = [self.rows_at(k) for k in steps[start : start + per_call]]
            rows = torch.cat([llm for llm, _ in picks])
            # Read before every call: under enable_model_cpu_offload the connector sits on the CPU until its
            # first call moves it (and that call's inputs) to the accelerator; later calls move no inputs.
            device = compute_device(self.connector)
            rows = rows.to(device)
            t = torch.tensor(chunk, device=device).repeat_interleave(slots)
            mask = None if self.mask is None else self.mask.to(device)[rows]
            weights = None if self.weights is None else self.weights.to(device)[rows]
            states = self.states.to(device)
            states = states.repeat(n, 1, 1) if self._slot_rows is None else states[rows]
            out = self.connector(states, t, attention_mask=mask, text_weights=weights)
            if self.with_pooled:
                mask = None if mask is None else mask.to(out.device)
                pooled.append(self.connector.pool(out, mask).view(n, slots, -1))
            out = out.view(n, slots, *out.shape[1:])
            if self.clip is not None:
                out = self.clip.join(out, torch.stack([clip for _, clip in picks]))
            tokens.append(out)
        return torch.cat(tokens), (torch.cat(pooled) if pooled else None)

    def precompute(self) -> None:
        """Run the connector for the whole schedule (once; later calls return at once)."""
        if self._filled:
            return
        schedule = self._schedule_fn() if self._schedule_fn is not None else []
        if isinstance(schedule, torch.Tensor):
            values = [float(x) for x in schedule.reshape(-1).tolist()]  # one device sync per generation
        else:
            values = [float(x) for x in schedule]
        unique = list(dict.fromkeys(values))  # second-order schedulers repeat timesteps: computed once
        self._by_value = {v: i for i, v in enumerate(unique)}
        if isinstance(schedule, torch.Tensor) and schedule.ndim == 1:
            self._schedule = schedule
            self._by_address = {element.data_ptr(): self._by_value[v] for element, v in zip(schedule, values)}
        begin = (self._run_from() if self._run_from is not None else None) or 0
        self._run_values = list(dict.fromkeys(values[begin:])) or unique
        step = {v: k for k, v in enumerate(self._run_values)}
        self._step_of = [step.get(v, 0) for v in unique]  # timesteps before img2img's start: never run
        if self._slot_fn is not None:
            self._slot_rows = self._slot_fn(max(1, len(self._run_values)))
        if unique:
            self._tokens, self._pooled = self.run(unique, self._step_of)
            if self.mask is not None:  # where the lookups index it: no copy per step
                self.mask = self.mask.to(self._tokens.device)
        self._filled = True

    def position(self, timestep: torch.Tensor | float) -> int | None:
        """``timestep``'s position in the table (by address, else by value; see the class docstring), or None."""
        s = self._schedule
        if (
            isinstance(timestep, torch.Tensor)
            and s is not None
            and timestep.numel() == 1
            and timestep.device == s.device
            and timestep.dtype == s.dtype
        ):
            found = self._by_address.get(timestep.data_ptr())
            if found is not None:
                return found
        return self._by_value.get(float(timestep))

    def step_of(self, timestep: torch.Tensor | float) -> int:
        """The (0-based) step whose prompt applies at ``timestep``; off the schedule: the nearest step's."""
        pos = self.position(timestep)
        if pos is not None:
            return self._step_of[pos]
        if not self._run_values:
            return 0
        value = float(timestep)
        return min(range(len(self._run_values)), key=lambda k: abs(self._run_values[k] - value))

    def lookup(self, timestep: torch.Tensor | float, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``[len(rows), tokens, width]`` and pooled ``[len(rows), pooled_dim]`` (or None) at one timestep.

        ``rows`` are the placeholder's values: slots (rows, without a schedule)."""
        self.precompute()
        pos = self.position(timestep)
        if pos is None:
            tokens, pooled = self.run([float(timestep)], [self.step_of(timestep)])
            pos = 0
        else:
            tokens, pooled = self._tokens, self._pooled
        rows = rows.to(tokens.device)
        return tokens[pos, rows], (None if pooled is None else pooled[pos, rows])

    def encoder_attention_mask(self, rows: torch.Tensor, timestep: torch.Tensor | float = 0) -> torch.Tensor | None:
        """For connectors whose output follows the text (MLP variant), the text mask of each sample's row
        (``rows``: the placeholder's slots; ``timestep``: the call's, a number or a tensor of one or per sample)."""
        if self.mask is None or not getattr(self.connector, "output_follows_text", False):
            return None  # checked first: the common case costs the step no kernel
        step = 0
        if self._slot_rows is not None:  # with prompt editing the row depends on the step
            first = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep  # same address
            step = self.step_of(first)
        texts = self.rows_at(step)[0]
        mask = self.mask[texts.to(self.mask.device)[rows.to(self.mask.device)]]
        return mask if self.clip is None else self.clip.join_mask(mask)


@dataclass
class SlotRows:
    """Per slot (prompt given) and step: the LLM feature row to read, and the CLIP row (None: the same)."""

    llm: torch.Tensor  # [slots, steps] long
    clip: torch.Tensor | None = None


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

    embeds: torch.Tensor  # [clip rows, 77 * windows, width]: CLIP's hidden states of each distinct CLIP text
    clip_first: bool = True
    clip_scale: float = 1.0
    ella_scale: float = 1.0

    def join(self, ella: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``ella`` ``[n, slots, tokens, width]`` -> ``[n, slots, 77 + tokens, width]``; ``rows`` ``[n, slots]``:
        the CLIP row each slot reads at each of the ``n`` timesteps."""
        clip = self.embeds.to(ella.device, ella.dtype)[rows.to(ella.device)]
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
    """The table row of each sample of a placeholder batch (see :func:`placeholder_embeds`)."""
    return placeholder[:, 0, 0].round().long()


def is_placeholder(embeds: object) -> bool:
    """Whether ``embeds`` is a placeholder batch: one token of width one, which no text encoder produces."""
    return isinstance(embeds, torch.Tensor) and embeds.ndim == 3 and embeds.shape[1:] == (1, 1)


class ConditionFeed:
    """Hands each UNet / ControlNet call that carries placeholder embeds the condition of its own timestep.

    ``with ConditionFeed(get_table).install([unet, controlnet]): ...`` registers one forward pre-hook
    per module (``None`` entries are skipped) and removes them on leaving the block, also when the
    block raises; :meth:`remove` does the same by hand. ``table`` is a getter, because a pipeline
    builds the table only once its ``encode_prompt`` has run inside the call.

    What a hooked call gets, given ``(sample, timestep, encoder_hidden_states, ...)`` positionally or
    by keyword (the UNet2DConditionModel and ControlNetModel signatures; a MultiControlNetModel is
    hooked as one module and passes the condition on to each of its nets):

    * only calls whose ``encoder_hidden_states`` is a placeholder are touched; any other call (real
      embeds, e.g. a user's own UNet call, or no table yet) passes through unchanged;
    * ``encoder_hidden_states`` becomes the table's tokens for the placeholder's rows at the call's
      timestep. CFG batches and ``num_images_per_prompt`` repeats need nothing special: the
      placeholder was concatenated and repeated by the loop exactly as the latents were;
    * ``timestep`` may be a number, a 0-d or one-element tensor, or a batch: an expanded scalar
      (``t.expand(n)``) is one timestep; distinct per-sample timesteps each get their own condition
      (looked up by value: one device sync per call);
    * SDXL: a placeholder ``added_cond_kwargs["text_embeds"]`` becomes the connector's pooled
      embedding at that timestep, when the table has a pooling head (otherwise the pipeline put
      CLIP's real pooled embedding there, left alone);
    * MLP-variant connectors (output as long as the text): ``encoder_attention_mask`` is set to each
      sample's text mask, so the padding of a flexible-length batch is not attended to. diffusers'
      ControlNetModel takes no such mask: a ControlNet attends to that padding (the UNet does not).

    The hook runs before the module's ``forward`` and so before any accelerate/diffusers offload hook
    wrapped around it, which then moves the condition like any other input. It is kept out of
    ``torch.compile`` graphs: the table lookup is Python, and a compiled UNet must not recompile
    for every timestep.
    """

    def __init__(self, table: Callable[[], ConditionTable | None]):
        self.table = table
        self._handles: list[RemovableHandle] = []

    def install(self, modules: Iterable[nn.Module | None]) -> ConditionFeed:
        """Hook ``modules``; returns ``self`` for use as a context manager."""
        for module in modules:
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        """Unhook every module :meth:`install` hooked (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ConditionFeed:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    @torch.compiler.disable
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = len(args) > 2
        embeds = args[2] if positional else kwargs.get("encoder_hidden_states")
        table = self.table()
        if table is None or not is_placeholder(embeds):
            return None
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        rows = placeholder_rows(embeds)
        tokens, pooled = self._condition(table, timestep, rows)
        if positional:
            args = (*args[:2], tokens.to(embeds.device), *args[3:])
        else:
            kwargs["encoder_hidden_states"] = tokens.to(embeds.device)
        added = kwargs.get("added_cond_kwargs")
        if pooled is not None and added and "text_embeds" in added:
            kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled.to(embeds.device)}
        mask = table.encoder_attention_mask(rows, timestep)
        if mask is not None and "encoder_attention_mask" in inspect.signature(module.forward).parameters:
            kwargs["encoder_attention_mask"] = mask.to(embeds.device)
        return args, kwargs

    @staticmethod
    def _condition(
        table: ConditionTable, timestep: torch.Tensor | float, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(timestep, torch.Tensor) or timestep.numel() == 1:
            return table.lookup(timestep, rows)
        if timestep.ndim == 1 and timestep.stride(0) == 0:  # t.expand(batch): one element, still at its address
            return table.lookup(timestep[0], rows)
        if timestep.numel() != len(rows):
            raise EllaError(
                f"the UNet was called with {timestep.numel()} timesteps for {len(rows)} samples; "
                "give one timestep, or one per sample"
            )
        parts = [table.lookup(t, rows[i : i + 1]) for i, t in enumerate(timestep.reshape(-1).tolist())]
        tokens = torch.cat([p[0] for p in parts])
        return tokens, (None if parts[0][1] is None else torch.cat([p[1] for p in parts]))
