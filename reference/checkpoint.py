"""Run directories: what `imagen-train` writes and `imagen-export` reads.

```
run/
  config.json                 cascade, Unets, text encoder and training settings
  text_encoder/               T5 weights (safetensors), config, tokenizer settings
  checkpoints/latest          name of the newest complete checkpoint (replaced atomically)
  checkpoints/step_000200/    model.safetensors, ema.safetensors, optimizer.safetensors, state.json
  best.safetensors            weights with the lowest validation loss (step and loss in its metadata)
  log.jsonl  samples/
```

A checkpoint folder is staged under a temporary name and renamed when complete, then
`latest` is switched to it, so a killed process leaves the previous checkpoint intact.
MinImagen training directories load into the same `Run` (`imagen.reference.minimagen`).
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imagen._io import atomic_save
from imagen._io import atomic_write as write_atomic  # the name the rest of imagen.reference imports

from .imagen import Imagen, ImagenConfig
from .text_encoder import TextEncoder
from .unet import UnetConfig

RUN_FORMAT, RUN_FORMAT_VERSION = "imagen-run", 1
WEIGHT_KINDS = ("latest", "best", "ema")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be read; the message names the file and the fix."""


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Saves `tensors` (moved to the CPU) as one safetensors file, atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_save(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


@dataclass
class Run:
    """A loaded run: the cascade with chosen weights, its text encoder and its config."""

    imagen: Imagen
    text_encoder: TextEncoder
    config: dict
    path: Path
    weights: str


def run_config(imagen: Imagen, text_encoder: TextEncoder, train: dict | None = None) -> dict:
    return {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "imagen": imagen.config.to_dict(),
        "unets": [unet.config.to_dict() for unet in imagen.unets],
        "text_encoder": {
            "path": "text_encoder",
            "kind": text_encoder.tokenizer.kind,
            "max_length": text_encoder.max_length,
            "embed_dim": text_encoder.embed_dim,
        },
        "train": train or {},
    }


def build_imagen(config: dict) -> Imagen:
    unets = [UnetConfig.from_dict(u) for u in config["unets"]]
    return Imagen(unets, ImagenConfig.from_dict(config["imagen"]), config["text_encoder"]["embed_dim"])


def join_run(run_dir: str | Path) -> tuple[Imagen, TextEncoder, dict, Path]:
    """The cascade (before its weights arrive), text encoder and config of a run that another
    process (rank 0 of a torchrun job) has just prepared."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise CheckpointError(
            f"{run_dir / 'config.json'}, which rank 0 wrote, is not visible to this process; "
            "--out must be on a file system that every node shares"
        )
    config = json.loads((run_dir / "config.json").read_text())
    return build_imagen(config), TextEncoder.from_folder(run_dir / "text_encoder"), config, run_dir


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing; delete {pointer} to start over")
    return folder


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict], state: dict, keep: int = 2) -> Path:
    """Writes checkpoints/step_N/ (one safetensors file per entry of `tensors`, state.json), then
    points `latest` at it and prunes all but the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for file, entries in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in entries.items()}, staging / f"{file}.safetensors")
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    write_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(run_dir: Path) -> None:
    """Removes what a killed process left half-written (staging folders, temporary files)."""
    run_dir = Path(run_dir)
    for pattern in ("checkpoints/.*.partial", "*.partial", ".*.tmp", "checkpoints/.*.tmp"):
        for leftover in run_dir.glob(pattern):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def load_run(run_dir: str | Path, weights: str = "latest") -> Run:
    """Loads a run directory of this project, or a MinImagen training directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; pass the --out folder of imagen-train")
    if (run_dir / "parameters").is_dir() and not (run_dir / "config.json").exists():
        raise CheckpointError(
            f"{run_dir} is a MinImagen training directory; load it with load_minimagen_run "
            "(imagen-export does this) and pass --text-encoder PATH to its T5 folder"
        )
    if weights not in WEIGHT_KINDS:
        raise CheckpointError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_KINDS)}")
    config_file = run_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config_file}: {error}") from error
    if config.get("format") != RUN_FORMAT or config.get("format_version") != RUN_FORMAT_VERSION:
        raise CheckpointError(f"{config_file} is not an {RUN_FORMAT} v{RUN_FORMAT_VERSION} config")
    imagen = build_imagen(config)
    text_encoder = TextEncoder.from_folder(run_dir / config["text_encoder"]["path"])
    if weights == "best":
        file = run_dir / "best.safetensors"
    else:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; train it first (imagen-train --out {run_dir})")
        file = checkpoint / ("model.safetensors" if weights == "latest" else "ema.safetensors")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; choose other --weights ({', '.join(WEIGHT_KINDS)})")
    load_weights(imagen, file)
    return Run(imagen, text_encoder, config, run_dir, weights)


def load_weights(imagen: Imagen, file: Path) -> None:
    try:
        state = load_file(str(file))
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise CheckpointError(f"cannot read weights {file}: {error}") from error
    missing, unexpected = imagen.unets.load_state_dict(_strip(state, "unets."), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not fit the cascade in config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def truncate_log(path: Path, step: int) -> None:
    """Keeps one record for each step up to `step` (the checkpoint a run resumes from), atomically.

    A run killed after its last checkpoint logged steps that the resumed run does again; they are
    dropped here, as is a line cut short by the kill. Where a step appears twice (a log written
    before this rule), its last record is kept."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept: dict[int, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and 0 < record["step"] <= step:
            kept[record["step"]] = line
    ordered = [kept[s] for s in sorted(kept)]
    if ordered != lines:
        write_atomic(path, "".join(line + "\n" for line in ordered))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Adam state as flat tensors (safetensors) plus its JSON-able settings."""
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, settings: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": settings["param_groups"]})


def restore_checkpoint(checkpoint: Path, imagen: Imagen, optimizer, scaler, device) -> tuple[dict, int, float]:
    """Loads a checkpoint's weights, optimizer (and gradient scaler) state; returns (EMA weights, step,
    best validation loss)."""
    imagen.unets.load_state_dict({k[6:]: v for k, v in load_file(checkpoint / "model.safetensors").items()})
    ema = {k[6:]: v.to(device) for k, v in load_file(checkpoint / "ema.safetensors").items()}
    state = json.loads((checkpoint / "state.json").read_text())
    load_optimizer(optimizer, load_file(checkpoint / "optimizer.safetensors"), state["optimizer"])
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    return ema, state["step"], state["best_val_loss"]


def save_best(imagen: Imagen, out: Path, step: int, val_loss: float) -> None:
    save_safetensors_atomic(
        {f"unets.{k}": v for k, v in imagen.unets.state_dict().items()},
        out / "best.safetensors",
        metadata={"step": str(step), "val_loss": repr(val_loss)},
    )
