"""Training the cascade: `train(TrainConfig)` is what `imagen-train` runs.

Every random choice of step s (the batch, t, noise, dropped captions) is drawn for the global
batch from generators seeded with (seed, s), so `--resume` continues exactly where an
uninterrupted run would be, at any number of processes. Ctrl-C writes a checkpoint of the last
finished step before it stops; SIGTERM (and, under torchrun, Ctrl-C) stops every process after
the same step and saves it. Under `torchrun` the processes train one model with DDP
(imagen.reference.distributed; docs/training.md): rank 0 alone writes files and previews.
"""

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imagen._io import atomic_save

from .checkpoint import (
    CheckpointError,
    build_imagen,
    clean_partial,
    join_run,
    latest_checkpoint,
    optimizer_tensors,
    restore_checkpoint,
    run_config,
    save_best,
    save_checkpoint,
    truncate_log,
    write_atomic,
)
from .data import FolderData, ShapesData, make_dataset
from .distributed import (
    PRECISIONS,
    CascadeLoss,
    Distributed,
    StopSignals,
    autocast,
    check_all_used,
    check_batch,
    check_replicas,
    draw_batch_slice,
    global_draws,
    micro_batches,
)
from .imagen import Imagen, ImagenConfig
from .images import to_uint8
from .samplers import SAMPLERS
from .text_encoder import TextEncoder
from .unet import UnetConfig, preset_config


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C or SIGTERM once the last finished step is saved."""


@dataclass
class TrainConfig:
    out: str
    dataset: str = "shapes"
    unets: tuple = ("BaseTest", "SuperTest")  # preset names or JSON files of Unet parameters
    unet_overrides: dict = field(default_factory=dict)  # applied to every Unet, e.g. {"dim": 32}
    image_sizes: tuple = (32, 64)
    timesteps: int = 1000
    schedule: str = "linear"
    batch_size: int = 16  # the global batch: split over the processes and the grad_accum micro-batches
    steps: int = 1000
    epochs: float | None = None
    lr: float = 1e-4
    cond_drop_prob: float = 0.1
    guidance_scale: float = 5.0
    text_encoder: str = "tiny"  # 'tiny' (offline byte-level T5) or a local T5 folder
    max_length: int = 64
    train_unets: tuple | None = None  # indices; None trains all
    # Low-res augmentation in training: noise times drawn below this fraction of T. Small
    # super-resolution Unets trained over the full range learn to ignore their low-res input.
    lowres_max_noise_level: float = 1.0
    ema_decay: float = 0.999
    grad_accum: int = 1  # micro-batches per step, each batch_size / (processes * grad_accum) per process
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler)
    val_every: int = 200
    val_batches: int = 2
    checkpoint_every: int = 200
    sample_every: int | None = None  # defaults to checkpoint_every; 0 turns samples off
    sample_prompts: tuple = (
        "a small red circle on the left",
        "a large blue square in the middle",
        "a small green triangle at the top",
        "a large yellow circle on the right",
    )
    # Sample grids use the runtime's default sampler: all T ancestral DDPM steps per Unet took minutes on a CPU.
    preview_sampler: str = "dpmpp_2m"  # a key of imagen.reference.samplers.SAMPLERS
    preview_steps: int = 25  # per Unet, capped at its timesteps
    seed: int = 0
    threads: int | None = None
    resume: bool = False
    force: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check(config: TrainConfig) -> None:
    def positive(name, value):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    for name in ("batch_size", "steps", "grad_accum", "val_every", "checkpoint_every", "max_length", "preview_steps"):
        positive(name, getattr(config, name))
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    if config.preview_sampler not in SAMPLERS:
        raise ValueError(f"preview_sampler must be one of {', '.join(SAMPLERS)}, got {config.preview_sampler!r}")
    if not 0 <= config.cond_drop_prob < 1:
        raise ValueError(f"cond_drop_prob must be in [0, 1), got {config.cond_drop_prob}")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"lr must be a positive number, got {config.lr}")
    sizes = list(config.image_sizes or ())
    if not sizes or not all(isinstance(s, int) and s >= 8 for s in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"image_sizes must be increasing integers of at least 8, got {config.image_sizes!r}")
    if len(config.unets) != len(config.image_sizes):
        raise ValueError(f"{len(config.unets)} Unets but {len(config.image_sizes)} image sizes")


def _unet_config(spec: str, overrides: dict, max_length: int) -> UnetConfig:
    if spec.endswith(".json"):
        try:
            params = json.loads(Path(spec).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read Unet parameters {spec}: {error}") from error
        config = UnetConfig.from_dict(params)
        return dataclasses.replace(config, **overrides, max_text_len=max_length)
    return preset_config(spec, **{**overrides, "max_text_len": max_length})


class EmbeddingCache:
    """Text embeddings per caption: the encoder is frozen, so each caption is encoded once."""

    def __init__(self, encoder: TextEncoder, limit: int = 50_000):
        self.encoder, self.limit, self.cache = encoder, limit, {}

    def __call__(self, captions: list[str]):
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if missing:
            embeds, mask = self.encoder.encode(missing)
            if len(self.cache) + len(missing) > self.limit:
                self.cache.clear()
            self.cache.update({c: (e, m) for c, e, m in zip(missing, embeds, mask)})
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


def _prepare_run(config: TrainConfig) -> tuple[Imagen, TextEncoder, dict, Path]:
    out = Path(config.out)
    if (
        config.resume
        and out.is_dir()
        and not (out / "config.json").is_file()
        and all(p.name == "text_encoder" or p.name.endswith(".tmp") for p in out.iterdir())
    ):
        shutil.rmtree(out)  # a run killed before it wrote config.json: nothing to keep, start it again
    if config.resume and out.exists():
        if not (out / "config.json").is_file():
            raise CheckpointError(f"nothing to resume in {out}: no config.json; drop --resume to start a run")
        clean_partial(out)
        run = json.loads((out / "config.json").read_text())
        return build_imagen(run), TextEncoder.from_folder(out / "text_encoder"), run, out
    if out.exists() and any(out.iterdir()):
        if not config.force:
            raise CheckpointError(
                f"{out} already exists and is not empty; pass --resume to continue it "
                "or --force to start over (deleting it)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if config.text_encoder == "tiny":
        encoder = TextEncoder.tiny(seed=config.seed, max_length=config.max_length)
    else:
        encoder = TextEncoder.from_folder(config.text_encoder, max_length=config.max_length)
    unets = [_unet_config(spec, config.unet_overrides, encoder.max_length) for spec in config.unets]
    cascade = ImagenConfig(
        image_sizes=tuple(config.image_sizes),
        timesteps=config.timesteps,
        schedule=config.schedule,
        cond_drop_prob=config.cond_drop_prob,
        guidance_scale=config.guidance_scale,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        imagen = Imagen(unets, cascade, encoder.embed_dim)
    encoder.save(out / "text_encoder")
    run = run_config(imagen, encoder, config.to_dict())
    write_atomic(out / "config.json", json.dumps(run, indent=2))
    return imagen, encoder, run, out


def _validation_loss(ctx, loss_model: CascadeLoss, imagen: Imagen, data, embed, config: TrainConfig, cast) -> float:
    for unet in imagen.unets:
        unet.eval()
    total, level = 0.0, config.lowres_max_noise_level
    with torch.no_grad():
        for batch in range(config.val_batches):
            images, captions = draw_batch_slice(ctx, data, config.batch_size, config.seed, batch, split_offset=1)
            draws = global_draws(ctx, imagen, loss_model.trained, config.batch_size, 10_000 + batch, level)
            for inputs in micro_batches(ctx, config.batch_size, config.grad_accum, images, captions, draws, embed):
                with cast():
                    losses = loss_model(*inputs)
                total += sum(loss.item() for loss in losses) / config.grad_accum
    return ctx.all_reduce([total])[0] / ctx.world_size / config.val_batches


def _save_samples(imagen: Imagen, run: dict, embed, config: TrainConfig, out: Path, step: int) -> None:
    from PIL import Image

    if next(imagen.parameters()).device.type != "cpu":  # Imagen.sample draws its noise on the CPU: a CPU copy
        on_cpu = build_imagen(run)
        on_cpu.load_state_dict(imagen.state_dict())
        imagen = on_cpu
    embeds, mask = embed(list(config.sample_prompts))
    steps = tuple(min(config.preview_steps, schedule.num_timesteps) for schedule in imagen.noise_schedulers)
    images = imagen.sample(
        embeds, mask, sampler=config.preview_sampler, steps=steps, noise=np.random.default_rng(config.seed)
    )
    images = to_uint8(images).numpy()  # (b, h, w, 3)
    grid = Image.fromarray(np.concatenate(list(images), axis=1))
    atomic_save(out / "samples" / f"step_{step:07d}.png", lambda tmp: grid.save(tmp, format="PNG"))


RESUMABLE = (
    "steps",
    "epochs",
    "val_every",
    "checkpoint_every",
    "sample_every",
    "threads",
    "progress",
    "train_unets",
    "lowres_max_noise_level",
    "preview_sampler",
    "preview_steps",
)


def _resumed_config(config: TrainConfig, run: dict, out: Path) -> TrainConfig:
    """The run's own saved settings, except the length, intervals, phase and previews, which a resume may change."""
    saved = {**run["train"], **{k: getattr(config, k) for k in RESUMABLE}}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kept = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in saved.items()
        if k in names and k not in ("out", "resume", "force")
    }
    return TrainConfig(out=str(out), resume=True, **kept)


def _backward_pass(ctx, model, imagen: Imagen, data, embed, config: TrainConfig, scaler, step: int, cast, first: bool):
    """The gradients of step `step`'s global batch: this rank's slice in `grad_accum` micro-batches
    (DDP reduces them after the last); returns this rank's mean loss."""
    for unet in imagen.unets:
        unet.train()
    images, captions = draw_batch_slice(ctx, data, config.batch_size, config.seed, step)
    loss_model = getattr(model, "module", model)
    seed, level = config.seed * 1_000_003 + step * 101, config.lowres_max_noise_level
    draws = global_draws(ctx, imagen, loss_model.trained, config.batch_size, seed, level)
    micro = micro_batches(ctx, config.batch_size, config.grad_accum, images, captions, draws, embed)
    loss_value = 0.0
    for k, inputs in enumerate(micro):
        with ctx.no_sync(model, skip=k < config.grad_accum - 1):
            with cast():
                loss = sum(model(*inputs))
            # Averaged over the accumulated micro-batches (MinImagen sums them).
            scaled = loss / config.grad_accum
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        if first and k == 0 and ctx.enabled:
            check_all_used(loss_model)
        loss_value += loss.item() / config.grad_accum
    return loss_value


def _optimizer_step(ctx, config: TrainConfig, params, optimizer, scaler, ema, imagen, loss_value, stop, step: int):
    """Agrees on the global loss and on stopping (one all-reduce), steps the optimizer and the EMA.
    Every rank holds the same reduced gradients, so every rank's weights and EMA stay identical."""
    stop_now = stop.received is not None
    if ctx.enabled:
        total, stops = ctx.all_reduce([loss_value, float(stop_now)])
        loss_value, stop_now = total / ctx.world_size, stops > 0
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr")
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in imagen.unets.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(config.ema_decay).add_(v, alpha=1 - config.ema_decay)
            else:
                ema[k].copy_(v)
    return loss_value, stop_now


def train(config: TrainConfig, log=None) -> dict:
    """Trains (or resumes) the run in `config.out`; returns a summary. `log(dict)` sees each step
    (on rank 0). Under torchrun every process calls this; see imagen.reference.distributed."""
    _check(config)
    ctx = Distributed.from_env()
    try:
        return _train(ctx, config, log)
    finally:
        ctx.close()


def _train(ctx: Distributed, config: TrainConfig, log) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    if not config.resume:
        check_batch(config.batch_size, ctx.world_size, config.grad_accum)
    prepared = ctx.on_main(partial(_prepare_run, config))
    imagen, encoder, run, out = prepared if ctx.is_main else join_run(config.out)
    if config.resume:
        config = _resumed_config(config, run, out)
    check_batch(config.batch_size, ctx.world_size, config.grad_accum)
    cast = autocast(config.precision, ctx.device)
    trained = list(config.train_unets) if config.train_unets is not None else list(range(len(imagen.unets)))
    data = make_dataset(config.dataset, max(imagen.image_sizes), seed=config.seed)
    val_data = ShapesData(max(imagen.image_sizes), seed=config.seed + 1) if config.dataset == "shapes" else data
    total_steps = config.steps
    if config.epochs is not None:
        total_steps = max(1, math.ceil(config.epochs * len(data) / config.batch_size))
    imagen.to(ctx.device)
    params = [p for i in trained for p in imagen.unets[i].parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scaler = torch.amp.GradScaler(ctx.device.type) if config.precision == "fp16" else None
    step, best_val, ema = 0, float("inf"), None
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        ema, step, best_val = restore_checkpoint(checkpoint, imagen, optimizer, scaler, ctx.device)
    ctx.broadcast_tensors(imagen.unets.state_dict().values())  # rank 0's weights everywhere (a new run's init)
    if ema is None:
        ema = {k: v.detach().clone() for k, v in imagen.unets.state_dict().items()}
    loss_model = CascadeLoss(imagen, trained)
    model = ctx.wrap(loss_model)
    embed = EmbeddingCache(encoder)
    if config.resume:
        ctx.on_main(partial(truncate_log, out / "log.jsonl", step))  # the steps after the checkpoint are done again

    def checkpoint_now(at_step: int):
        model_state = {f"unets.{k}": v for k, v in imagen.unets.state_dict().items()}
        ema_state = {f"unets.{k}": v for k, v in ema.items()}
        optim_tensors, optim_settings = optimizer_tensors(optimizer)
        tensors = {"model": model_state, "ema": ema_state, "optimizer": optim_tensors}
        check_replicas(ctx, {f"{file}/{k}": v for file, entries in tensors.items() for k, v in entries.items()})
        state = {"step": at_step, "best_val_loss": best_val, "optimizer": optim_settings}
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        ctx.on_main(partial(save_checkpoint, out, at_step, tensors, state))

    show = ctx.is_main and (sys.stderr.isatty() if config.progress is None else config.progress)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not show, desc="train", unit="step")
    sample_every = config.checkpoint_every if config.sample_every is None else config.sample_every
    log_file = open(out / "log.jsonl", "a", encoding="utf-8") if ctx.is_main else None
    started = time.time()
    last_loss, first = float("nan"), True
    stop = StopSignals(("SIGTERM", "SIGINT") if ctx.enabled else ("SIGTERM",))
    try:
        with stop:
            while step < total_steps:
                loss_value = _backward_pass(ctx, model, imagen, data, embed, config, scaler, step, cast, first)
                first = False
                loss_value, stop_now = _optimizer_step(
                    ctx, config, params, optimizer, scaler, ema, imagen, loss_value, stop, step
                )
                step += 1
                last_loss = loss_value
                record = {"step": step, "loss": loss_value, "time": round(time.time() - started, 3)}
                if step % config.val_every == 0 or step == total_steps:
                    record["val_loss"] = _validation_loss(ctx, loss_model, imagen, val_data, embed, config, cast)
                    if record["val_loss"] < best_val:
                        best_val = record["val_loss"]
                        ctx.on_main(partial(save_best, imagen, out, step, best_val))
                if ctx.is_main:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if log is not None:
                        log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                stopping = stop_now and step < total_steps
                if step % config.checkpoint_every == 0 or step == total_steps or stopping:
                    checkpoint_now(step)
                    if sample_every and not stopping and (step % sample_every == 0 or step == total_steps):
                        ctx.on_main(partial(_save_samples, imagen, run, embed, config, out, step))
                if stopping:
                    raise TrainingInterrupted(
                        f"stopped by {stop.received or 'a signal to another process'} after step {step}; the "
                        f"checkpoint is saved, continue with imagen-train --out {out} --resume"
                    )
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt as interrupt:
        if ctx.enabled:  # the ranks may be mid-step apart: nothing consistent to save
            raise TrainingInterrupted(
                f"interrupted at step {step} without saving; continue from the last checkpoint with "
                f"imagen-train --out {out} --resume"
            ) from interrupt
        checkpoint_now(step)
        raise TrainingInterrupted(
            f"interrupted at step {step}; the checkpoint is saved, continue with imagen-train --out {out} --resume"
        ) from interrupt
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    return {"steps": step, "loss": last_loss, "best_val_loss": best_val, "out": str(out)}


__all__ = ["TrainConfig", "train", "TrainingInterrupted", "FolderData"]
