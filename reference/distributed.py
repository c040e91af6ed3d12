"""Data-parallel training under `torchrun`: one process per device, plain PyTorch DDP.

`Distributed.from_env()` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...)
and joins the process group: NCCL with one GPU per process where CUDA is available, gloo on the
CPU. Without those variables training is one process on the CPU, exactly as it always was.

Exactness. Every random number of a step (the batch, t, the noise, the low-res augmentation, the
dropped captions) is drawn for the global batch, on every rank alike, from generators seeded by
(seed, step); each rank takes its contiguous slice [rank * B / W, (rank + 1) * B / W) and cuts it
into `grad_accum` micro-batches. So W processes compute the gradient of the same global batch as
one process (up to the order of floating-point sums), and a run resumed at any world size draws
what an uninterrupted one would.

Keeping the ranks in step: every collective is called by every rank, in the same order. Work that
rank 0 alone does (files, previews) runs inside `on_main`, which every rank leaves through the same
broadcast, so a failure there stops all ranks with rank 0's message instead of a hang. A stop signal
only sets a flag, which the ranks add up once per step, so all of them stop after the same step.
"""

import contextlib
import datetime
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import draw_batch
from .images import resize_image

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMEOUT = datetime.timedelta(minutes=30)  # the longest a rank waits for rank 0's files and previews
MESSAGE_BYTES = 2048


class DistributedError(RuntimeError):
    """The processes of a run cannot work together; the message names the rank and the fix."""


class RankZeroFailed(DistributedError):
    """What the other ranks raise when work that rank 0 did alone failed; carries its message."""


class RankZeroRefused(RankZeroFailed, ValueError):
    """As RankZeroFailed, for a user error on rank 0 (bad options, files): every rank exits with status 2."""


class ReplicaMismatchError(DistributedError):
    """Ranks that should hold identical weights do not."""


class UnusedParametersError(ValueError):
    """Trained parameters that take no part in the loss, which DDP cannot reduce."""


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and device; `enabled` when DDP is in use."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False
    owned: bool = False  # this object started the process group and ends it

    @classmethod
    def from_env(cls) -> "Distributed":
        """Joins the process group that torchrun describes, or returns the single-process context."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # started by the caller (tests, notebooks)
            device = _local_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_backend() == "nccl")
            return cls(dist.get_rank(), dist.get_world_size(), device, enabled=True)
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        if not dist.is_available():
            raise DistributedError(f"this PyTorch ({torch.__version__}) has no torch.distributed; run one process")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = _local_device(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
        backend = "nccl" if device.type == "cuda" else "gloo"
        options = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT, **options)
        return cls(rank, world_size, device, enabled=True, owned=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False

    def batch_slice(self, batch_size: int) -> tuple[int, int]:
        """This rank's share [start, stop) of a global batch of `batch_size`."""
        share = batch_size // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums `values` over the ranks (float64); one process returns them as they are."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return self.all_reduce([float(flag)])[0] > 0

    def on_main(self, fn):
        """Runs `fn()` on rank 0 only; every rank then meets at one broadcast (the barrier after
        it), and if `fn` failed every rank raises: rank 0 its error, the others RankZeroFailed with
        its message (RankZeroRefused, a ValueError, for a user error). Returns `fn()`'s result on
        rank 0, None elsewhere."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as caught:  # noqa: BLE001 - re-raised below, after the others know
                error = caught
        if self.enabled:
            refused = isinstance(error, (ValueError, OSError))  # a user error: the others say the same
            text = "" if error is None else ("R" + str(error) if refused else f"F{type(error).__name__}: {error}")
            message = self._broadcast_text(text)
            if message.startswith("R") and not self.is_main:
                raise RankZeroRefused(message[1:])
            if message and not self.is_main:
                raise RankZeroFailed(f"rank 0 failed, so rank {self.rank} stops too: {message[1:]}")
        if error is not None:
            raise error
        return result

    def _broadcast_text(self, text: str) -> str:
        import torch.distributed as dist

        buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        data = text.encode()[: MESSAGE_BYTES - 1]
        if self.is_main and data:
            buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        dist.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).rstrip(b"\0").decode(errors="replace")

    def broadcast_tensors(self, tensors) -> None:
        """Copies rank 0's values of `tensors` into every rank's (in place)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.broadcast(tensor.data, 0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module that training calls: DDP around `module` across processes, else `module`.

        find_unused_parameters=False: a parameter outside the loss is an error (check_all_used),
        not a silent cost every step. broadcast_buffers=False: the Unets' buffers are constants."""
        if not self.enabled:
            return module
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.13
        buffers = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=False, **buffers)

    def no_sync(self, model: nn.Module, skip: bool):
        """DDP's no_sync for the micro-batches before the last of a step (their gradients add up locally)."""
        return model.no_sync() if skip and self.enabled else contextlib.nullcontext()


def _local_device(local_rank: int, cuda: bool) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK is {local_rank} but this node sees {count} GPU(s); start at most {count} "
            "processes per node (torchrun --nproc-per-node)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def check_batch(batch_size: int, world_size: int, grad_accum: int) -> None:
    parts = world_size * grad_accum
    if batch_size % parts:
        raise ValueError(
            f"--batch-size {batch_size} does not divide into {world_size} process(es) x {grad_accum} "
            f"micro-batch(es) (--grad-accum); the global batch is split evenly, so choose a multiple of {parts}"
        )


def autocast(precision: str, device: torch.device):
    """A factory of the autocast context for `precision` on `device`; fp32 uses none (as before)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = PRECISIONS[precision]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bf16; use --precision fp16 or fp32")
    with warnings.catch_warnings():  # an unsupported dtype makes autocast warn and switch itself off
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            supported = torch.is_autocast_enabled(device.type)
    if not supported:
        raise ValueError(
            f"--precision {precision}: this PyTorch ({torch.__version__}) has no {dtype} autocast on "
            f"{device.type}; use --precision {'bf16' if precision == 'fp16' else 'fp32'}"
        )
    return lambda: torch.autocast(device.type, dtype=dtype)


class StopSignals:
    """Turns stop signals into a request that training reads once per step (`received`), so every
    rank stops after the same step and saves it. Installed only in the main thread."""

    def __init__(self, names: tuple[str, ...]):
        self.names, self.received, self._previous = names, None, {}

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


def check_all_used(module: nn.Module) -> None:
    """After the first backward: every trained parameter has a gradient (DDP cannot reduce the others)."""
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    if unused:
        raise UnusedParametersError(
            f"{len(unused)} trained parameter(s) got no gradient in the first step: {', '.join(unused[:12])}"
            f"{' ...' if len(unused) > 12 else ''}; DDP runs with find_unused_parameters=False, so every trained "
            "parameter must take part in the loss: drop those layers from the Unet's parameters, or leave that "
            "Unet out of --train-unets"
        )


def check_replicas(ctx: Distributed, tensors: dict[str, torch.Tensor]) -> None:
    """Raises ReplicaMismatchError unless every rank holds the same `tensors` (weights, EMA, optimizer
    state): the gradients are all-reduced, so they must be equal bit for bit. Compares float64 sums
    and sums of squares per tensor, gathered from all ranks."""
    if not ctx.enabled or ctx.world_size == 1:
        return
    import torch.distributed as dist

    names = sorted(tensors)
    local = torch.stack(
        [torch.stack([t.double().sum(), t.double().square().sum()]).to(ctx.device) for t in map(tensors.get, names)]
    )
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    differing = mismatched(names, [g.cpu() for g in gathered])
    if differing:
        raise ReplicaMismatchError(
            f"the ranks' copies differ in {len(differing)} tensor(s) ({', '.join(differing[:6])}); they must stay "
            "identical under DDP: check that every rank runs the same code, data and settings, and report a bug"
        )


def mismatched(names: list[str], fingerprints: list[torch.Tensor]) -> list[str]:
    """Names whose fingerprint (rows of `fingerprints[rank]`) differs between rank 0 and any other rank."""
    first = fingerprints[0]
    return [name for i, name in enumerate(names) if any(not torch.equal(f[i], first[i]) for f in fingerprints[1:])]


def draw_batch_slice(ctx: Distributed, dataset, batch_size: int, seed: int, step: int, split_offset: int = 0):
    """This rank's slice of `draw_batch(dataset, batch_size, seed, step, split_offset)`. Each rank
    reads only its own items; should any rank meet an unreadable one, all draw the whole batch
    (draw_batch replaces it by a later draw, which shifts every position after it)."""
    start, stop = ctx.batch_slice(batch_size)
    if not ctx.enabled:
        images, captions = draw_batch(dataset, batch_size, seed, step, split_offset)
        return images[start:stop], captions[start:stop]
    rng = np.random.default_rng([seed, step, split_offset])  # draw_batch's draws, one integer at a time
    indices = [int(rng.integers(len(dataset))) for _ in range(batch_size)]
    items = [dataset[i] for i in indices[start:stop]]
    if ctx.any(any(item is None for item in items)):
        images, captions = draw_batch(dataset, batch_size, seed, step, split_offset)
        return images[start:stop], captions[start:stop]
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def micro_batches(ctx: Distributed, batch_size: int, grad_accum: int, images, captions, draws, embed):
    """(images, text_embeds, text_mask, draws) on the device for each of the `grad_accum` micro-batches
    of this rank's slice (images, captions) of the global batch; `draws` (the global batch's) are
    cut to the same rows. `embed(captions)` gives the text embeddings."""
    offset = ctx.batch_slice(batch_size)[0]
    micro = len(captions) // grad_accum
    for start in range(0, len(captions), micro):
        stop = start + micro
        embeds, mask = embed(captions[start:stop])
        cut = [d.slice(offset + start, offset + stop) for d in draws]
        yield images[start:stop].to(ctx.device), embeds.to(ctx.device), mask.to(ctx.device), cut


@dataclass
class LossDraws:
    """The random numbers of one Unet's training loss, for a whole (global) batch."""

    times: torch.Tensor  # (b,) int
    noise: torch.Tensor  # (b, c, s, s)
    text_keep: torch.Tensor  # (b,) bool
    lowres_noise_times: torch.Tensor | None = None  # (b,) int, one level per global batch
    lowres_noise: torch.Tensor | None = None  # (b, c, s, s)

    def slice(self, start: int, stop: int) -> "LossDraws":
        cut = {k: None if v is None else v[start:stop] for k, v in vars(self).items()}
        return LossDraws(**cut)


def draw_loss_inputs(imagen, unet_index: int, batch: int, generator: torch.Generator, max_level: float) -> LossDraws:
    """What `Imagen.loss` draws for a batch of `batch`, from `generator` in the same order."""
    schedule = imagen.noise_schedulers[unet_index]
    shape = (batch, imagen.config.channels, imagen.image_sizes[unet_index], imagen.image_sizes[unet_index])
    device = generator.device
    times = schedule.sample_random_times(batch, generator=generator, device=device)
    lowres_noise_times = lowres_noise = None
    if unet_index > 0:
        level = imagen.lowres_noise_schedule.sample_random_times(
            1, generator=generator, device=device, max_level=max_level
        )
        lowres_noise_times = level.expand(batch)
        lowres_noise = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    text_keep = torch.rand(batch, generator=generator, device=device) >= imagen.config.cond_drop_prob
    return LossDraws(times, noise, text_keep, lowres_noise_times, lowres_noise)


def global_draws(ctx: Distributed, imagen, trained: list[int], batch_size: int, seed: int, max_level: float) -> list:
    """Each trained Unet's LossDraws for the global batch, in turn from one generator on the device."""
    generator = torch.Generator(ctx.device).manual_seed(seed)
    return [draw_loss_inputs(imagen, i, batch_size, generator, max_level) for i in trained]


class CascadeLoss(nn.Module):
    """The trained Unets' losses on a slice of the global batch, given that batch's draws: the same
    arithmetic as `Imagen.loss` (a test holds them equal bit for bit). This is the module DDP wraps;
    parameter names are the cascade's (`unets.<index>.`), and only the trained Unets are inside."""

    def __init__(self, imagen, trained: list[int]):
        super().__init__()
        self.unets = nn.ModuleDict({str(i): imagen.unets[i] for i in trained})
        self.trained = list(trained)
        self._imagen = (imagen,)  # a tuple, so not a submodule: DDP sees the trained Unets alone

    def forward(self, images, text_embeds, text_mask, draws: list[LossDraws]) -> list[torch.Tensor]:
        """images (b, c, h, w) in [0, 1]; one draw per trained Unet, sliced to b; one loss per trained Unet."""
        return [self._unet_loss(i, images, text_embeds, text_mask, d) for i, d in zip(self.trained, draws)]

    def _unet_loss(self, index: int, images, text_embeds, text_mask, draws: LossDraws) -> torch.Tensor:
        imagen = self._imagen[0]
        size, schedule = imagen.image_sizes[index], imagen.noise_schedulers[index]
        lowres_cond_img = lowres_noise_times = None
        if index > 0:
            low = resize_image(images, imagen.image_sizes[index - 1], clamp_range=(0.0, 1.0))
            low = resize_image(low, size, clamp_range=(0.0, 1.0)) * 2 - 1  # normalised before noising
            lowres_cond_img = imagen.lowres_noise_schedule.q_sample(low, draws.lowres_noise_times, draws.lowres_noise)
            lowres_noise_times = draws.lowres_noise_times.float()
        x_start = resize_image(images, size) * 2 - 1
        x_noisy = schedule.q_sample(x_start, draws.times, draws.noise)
        pred = self.unets[str(index)](
            x_noisy,
            draws.times.float(),
            text_embeds=text_embeds,
            text_mask=text_mask,
            text_keep=draws.text_keep,
            lowres_cond_img=lowres_cond_img,
            lowres_noise_times=lowres_noise_times,
        )
        return F.mse_loss(pred, draws.noise)
