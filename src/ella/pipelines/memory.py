"""Low-VRAM inference: only the model that is running sits on the accelerator.

Why this works for ELLA: the models of a generation run one after another and never need each other's
weights. The LLM runs once per prompt, before the loop; the connector runs once per call (all timesteps
in one batch, at the first UNet call); then the UNet runs every step; then the VAE once. Keeping all of
them on the GPU (SD1.5 + Flan-T5-XL's encoder in fp16: 2.4 GB of T5 + 1.7 GB of UNet + the rest) is
what costs 5.2 GB at 512x512; with one model at a time the peak is the largest model plus its
activations (the T5 encoder: 2.4 GB of fp16 weights; 2.51 GB peak measured on an H200), or the
UNet's with ``llm_device="cpu"`` (1.88 GB). The price is one host-to-device copy of each model per call.

That price is what :class:`PinnedCpuOffload` keeps small. accelerate's hook moves a model back with
``module.to("cpu")``: a device-to-host copy into fresh pageable memory, and the next load copies from
pageable memory again (measured on an H200, SD1.5 + T5-XL, 512², b1: 3.65 s/image against 1.56 s without
offload). The models are frozen, so the CPU copy never goes stale: keep it, page-locked, and "offloading"
is pointing the parameters back at it (no copy); loading is one DMA copy from pinned memory.

The machinery is diffusers' own ``enable_model_cpu_offload`` (accelerate's ``CpuOffload`` hooks); what
diffusers 0.42 does, read from ``DiffusionPipeline.enable_model_cpu_offload``:

* the components named in ``model_cpu_offload_seq`` get chained hooks: a model moves to the accelerator
  when its ``forward`` is called, and the *previous* model of the sequence moves back to the CPU at
  that moment (skipped when it is already there);
* ``None`` components are skipped, and the chain links the neighbours around them;
* a module missing from the sequence gets a hook with no predecessor: once used it stays on the
  accelerator until ``maybe_free_model_hooks()`` at the end of ``__call__``. That is where the LLM and
  the connector were before :class:`EllaOffloadMixin` put them in the sequence: the LLM sat on the GPU
  through the whole UNet loop;
* ``_exclude_from_cpu_offload`` modules are moved to the accelerator for good;
* ``maybe_free_model_hooks()`` calls ``enable_model_cpu_offload`` again after every generation, so what
  ELLA changes about the hooks is done in an override of that method, not once after it.
"""

from __future__ import annotations

import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module
from torch import nn

from ..devices import check_device
from ..errors import EllaError

#: ELLA's models, first in every ELLA pipeline's ``model_cpu_offload_seq`` (before the parent's own order:
#: CLIP text encoder(s) -> image_encoder -> unet -> vae). The LLM runs first; the connector runs at the
#: first UNet call, so its hook offloads the LLM before the UNet loads, in every condition mode. (In
#: ``ella+clip`` mode the CLIP encoders run between the two, while the LLM is still resident; the
#: connector then stays resident through the loop, since the UNet's hook offloads the last text encoder.)
ELLA_OFFLOAD_HEAD = ("llm", "connector")
#: Modules whose ``forward`` reads a child's weights without calling the child: accelerate must load them
#: whole under sequential offload (``nn.MultiheadAttention`` reads ``out_proj.weight`` itself).
_LOAD_WHOLE = ["MultiheadAttention"]


class PinnedCpuOffload(CpuOffload):
    """accelerate's model-offload hook, with a kept (page-locked on CUDA) CPU copy of the model's tensors.

    * Loading is accelerate's ``module.to(device)``; from page-locked memory it runs at full DMA speed.
    * Offloading points every tensor that still holds what was loaded back at its CPU copy: no copy at all.
      A tensor changed while on the accelerator (replaced, or written in place: its ``_version`` moved, e.g.
      a LoRA fused into it) is copied back for real and becomes the new CPU copy, so nothing is lost.
    * Quantised tensor subclasses (no plain storage) move as accelerate moves them.
    * It is still a ``CpuOffload``: diffusers recognises it (LoRA loading lifts and restores the offload).

    The copies live on the module (``_ella_cpu_copies``, name -> tensor), not on the hook: diffusers
    rebuilds the hooks after every generation, and the copies must outlive that.
    """

    def init_hook(self, module: nn.Module) -> nn.Module:
        copies: dict[str, torch.Tensor] = module.__dict__.setdefault("_ella_cpu_copies", {})
        loaded: dict[str, tuple[int, int]] = module.__dict__.setdefault("_ella_loaded", {})
        pin = torch.device(self.execution_device).type == "cuda"
        for name, t in _tensors(module):
            if type(t.data) is not torch.Tensor:  # a quantised tensor subclass (no data_ptr): accelerate's copy
                t.data = t.data.to("cpu")
                continue
            home = copies.get(name)
            if home is not None and t.data_ptr() == home.data_ptr():
                continue  # already at home
            if home is not None and loaded.get(name) == (t.data_ptr(), t._version):
                t.data = home  # unchanged since it was loaded: the CPU copy is still exact
                continue
            cpu = t.data.to("cpu")
            copies[name] = t.data = cpu.pin_memory() if pin and not cpu.is_pinned() else cpu
        loaded.clear()
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        args, kwargs = super().pre_forward(module, *args, **kwargs)
        loaded = module.__dict__.setdefault("_ella_loaded", {})
        if not loaded:  # just loaded: remember what was loaded, to recognise it unchanged at offload time
            loaded.update({n: (t.data_ptr(), t._version) for n, t in _tensors(module) if type(t.data) is torch.Tensor})
        return args, kwargs


def _tensors(module: nn.Module):
    """(qualified name, parameter or buffer) of every tensor the module holds."""
    yield from module.named_parameters()
    yield from ((name, b) for name, b in module.named_buffers() if b is not None)


class EllaOffloadMixin:
    """diffusers' CPU offload, made aware of ELLA's LLM and connector (mixed into every ELLA pipeline class).

    * ``model_cpu_offload_seq`` is the parent's with ``llm -> connector`` in front (set per subclass);
    * after :func:`enable_low_vram` with ``llm_device="cpu"``, the LLM stays off every offload hook and on
      the CPU: its features go to the accelerator with the connector's inputs (the connector's hook moves them);
    * ``enable_sequential_cpu_offload`` loads the connector's attention layers whole (see ``_LOAD_WHOLE``).
    """

    #: Set by :func:`enable_low_vram`: the LLM's device for good (the CPU), or None: offloaded like the rest.
    _ella_llm_device: torch.device | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        seq = getattr(cls, "model_cpu_offload_seq", None)
        if seq:
            rest = [name for name in seq.split("->") if name not in ELLA_OFFLOAD_HEAD]
            cls.model_cpu_offload_seq = "->".join([*ELLA_OFFLOAD_HEAD, *rest])

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """diffusers' model offload (``llm -> connector`` first) with :class:`PinnedCpuOffload` hooks; a
        CPU-resident LLM is left off the hooks."""
        for hook in getattr(self, "_all_hooks", None) or []:
            hook.offload()  # through our hooks (no copy), before diffusers' pipe.to("cpu") copies the last model
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        llm = getattr(self, "llm", None)
        llm_stays = self._ella_llm_device is not None and isinstance(llm, nn.Module)
        if llm_stays:  # first: a CPU-resident LLM needs no page-locked copy of its weights
            for hook in [h for h in self._all_hooks if h.model is llm]:
                hook.remove()  # the LLM's forward runs unhooked, where it is: on the CPU
                self._all_hooks.remove(hook)
                for later in self._all_hooks:  # the connector no longer "offloads" the LLM
                    if getattr(later.hook, "prev_module_hook", None) is hook:
                        later.hook.prev_module_hook = hook.hook.prev_module_hook
        for hook in self._all_hooks:
            pinned = PinnedCpuOffload(hook.hook.execution_device, hook.hook.prev_module_hook)
            add_hook_to_module(hook.model, pinned)  # replaces accelerate's hook; init_hook keeps the CPU copies
            hook.hook = pinned
        if llm_stays:
            llm.to(self._ella_llm_device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """diffusers' sequential offload, with the connector's attention layers loaded whole (and a
        CPU-resident LLM left unhooked)."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        llm, connector = getattr(self, "llm", None), getattr(self, "connector", None)
        if self._ella_llm_device is not None and isinstance(llm, nn.Module):
            remove_hook_from_module(llm, recurse=True)  # puts the weights back where they were: the CPU
        if isinstance(connector, nn.Module) and "connector" not in self._exclude_from_cpu_offload:
            remove_hook_from_module(connector, recurse=True)
            cpu_offload(
                connector,
                self._offload_device,
                offload_buffers=len(connector._parameters) > 0,  # diffusers' rule for the other components
                preload_module_classes=_LOAD_WHOLE,
            )


def check_low_vram(
    device: str | torch.device | None = None, llm_device: str | torch.device | None = None
) -> tuple[torch.device, bool]:
    """``(offload device, whether the LLM stays on the CPU)``, or one :class:`EllaError` line.

    ``device``: the accelerator the models take turns on (default: the CUDA GPU; ``"cpu"`` is accepted so
    that the hooks can be tested without one, and saves nothing). ``llm_device``: ``None`` (offloaded like
    the other models), ``"cpu"`` (stays on the CPU), or the offload device itself (same as ``None``).
    Moves nothing: the CLI calls this before loading any model.
    """
    if device is None and check_device(None) == "cpu":
        raise EllaError(
            "low-VRAM mode keeps idle models off the GPU, and this machine has no CUDA GPU; "
            "run on the CPU without it, or pass device= (e.g. 'mps')"
        )
    target = torch.device(check_device(None if device is None else str(device)))
    if target.type != "cpu" and target.index is None:
        target = torch.device(target.type, 0)  # diffusers' default index, said explicitly
    if llm_device is None:
        return target, False
    try:
        llm = torch.device(llm_device)
    except (RuntimeError, TypeError):
        raise EllaError(f"unknown llm_device {llm_device!r}; use 'cpu' or the offload device {str(target)!r}") from None
    if llm.type == "cpu":
        return target, True
    if (llm.type, llm.index or 0) != (target.type, target.index or 0):
        raise EllaError(
            f"llm_device {str(llm)!r} is not the offload device {str(target)!r}: the LLM either stays on "
            f"the CPU (llm_device='cpu') or takes turns on the same accelerator (llm_device=None)"
        )
    return target, False


def enable_low_vram(
    pipe: EllaOffloadMixin,
    *,
    llm_device: str | torch.device | None = None,
    device: str | torch.device | None = None,
    vae_tiling: bool | None = None,
) -> None:
    """Arrange an ELLA pipeline so that only the model that is running sits on the accelerator.

    1. Every argument is checked first (:func:`check_low_vram`); a refusal is one :class:`EllaError`
       line, and nothing has moved or been hooked by then.
    2. diffusers' ``enable_model_cpu_offload(device=...)`` moves every model to the CPU and hooks them in
       the order ``llm -> connector -> text encoder(s) -> image_encoder -> unet -> vae``: each model
       moves to ``device`` when it runs and pushes the previous one back, so the LLM has left the GPU
       before the UNet arrives. The latents are bit-identical to those without offloading (the same
       kernels on the same device; tests/test_low_vram.py compares them exactly on the CPU).
    3. ``llm_device="cpu"``: the LLM is left off the hooks and runs on the CPU for good (for GPUs that
       cannot hold it even alone; the encode is then as fast as the CPU). It keeps its dtype, so the
       features match the GPU's up to kernel rounding.
    4. VAE slicing (a batch decodes one image at a time: the peak of one image; a batch of one is
       untouched, larger ones differ by float rounding, ~1e-6, as the decoder's sums run per image) and, with
       ``vae_tiling=None``, tiling too: diffusers tiles only latents larger than the VAE's own
       ``sample_size`` (512 px for SD1.5, 1024 px for SDXL), so images up to that size decode whole and
       unchanged, and larger ones decode in overlapping tiles (blended seams, memory flat in image size).
       ``vae_tiling=False`` never tiles; ``True`` is the same as ``None`` but refuses a VAE without tiling.

    Undo with ``pipe.remove_all_hooks()`` and ``pipe.to(device)``; calling this again replaces the setup.
    """
    if not isinstance(pipe, EllaOffloadMixin):
        raise EllaError(f"enable_low_vram takes an ELLA pipeline (ella.load_pipeline(...)); got {type(pipe).__name__}")
    if getattr(pipe, "_ella_fast", False):
        raise EllaError(
            "enable_low_vram after enable_fast_inference: CUDA graphs hold fixed weight addresses and "
            "offloading moves the weights every call; use one or the other"
        )
    target, llm_on_cpu = check_low_vram(device, llm_device)
    vae = getattr(pipe, "vae", None)
    can_tile = vae is not None and hasattr(vae, "use_tiling") and hasattr(vae, "enable_tiling")
    if vae_tiling and not can_tile:
        raise EllaError(f"vae_tiling=True: this pipeline's VAE ({type(vae).__name__}) cannot decode in tiles")

    pipe._ella_llm_device = torch.device("cpu") if llm_on_cpu else None  # read by enable_model_cpu_offload
    pipe.enable_model_cpu_offload(device=target)

    if vae is not None and hasattr(vae, "use_slicing") and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if can_tile:
        if vae_tiling is False:
            vae.disable_tiling()
        else:
            vae.enable_tiling()
