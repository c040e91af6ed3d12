"""MinImagen training directories: `load_minimagen_run` reads one as MinImagen's training script
writes it (layout below) into a `Run`, as `load_run` reads a run of imagen-train. Its `.pth` files
are read with `weights_only=True` only. `minimagen_imagen_params` is that script's imagen_params
file with every default filled in, for writing such a directory (benchmarks, tests).
"""

import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, Run, run_config
from .imagen import Imagen, ImagenConfig
from .text_encoder import TextEncoder, TextEncoderError
from .unet import UnetConfig

# MinImagen training directories, as its training script writes them:
#   parameters/imagen_params_<timestamp>.json     Imagen arguments (image_sizes, timesteps, text_encoder_name, ...)
#   parameters/unet_<N>_params_<timestamp>.json   one per Unet, every Unet argument with its default filled in
#   state_dicts/unet_<N>_state_<timestamp>.pth    the Unet's best weights by validation loss (or, in early versions,
#                                                 unet_<N>_state_<timestamp>[_epoch_<E>]_<loss>.pth, one per new best)
#   tmp/unet_<N>_tmp.pth                          every Unet's latest weights, written at each checkpoint and when a
#                                                 training aborts (early versions: unet_<N>_<P>_percent.pth)
_STAMP = r"\d{8}_\d{6}"
_PARAMS = re.compile(rf"(?:unet_(?P<index>\d+)_params|imagen_params)(?:_(?P<stamp>{_STAMP}))?\.json")
_BEST = re.compile(
    rf"unet_(?P<index>\d+)_state_(?P<stamp>{_STAMP})(?:_epoch_(?P<epoch>\d+))?"
    r"(?:_(?P<loss>\d+(?:\.\d*)?|nan|inf))?\.pth"
)
_LATEST = re.compile(r"unet_(?P<index>\d+)_(?:tmp|(?P<percent>\d+)_percent)\.pth")
_NAMES = {"state_dicts": (_BEST, "unet_N_state_<timestamp>.pth"), "tmp": (_LATEST, "unet_N_tmp.pth")}


def minimagen_imagen_params(image_sizes: list[int], timesteps: int) -> dict:
    """MinImagen's imagen_params_<timestamp>.json as its training script writes it (every default filled in)."""
    return {
        "text_embed_dim": None,
        "channels": 3,
        "timesteps": timesteps,
        "cond_drop_prob": 0.15,
        "loss_type": "l2",
        "lowres_sample_noise_level": 0.2,
        "auto_normalize_img": True,
        "dynamic_thresholding_percentile": 0.9,
        "only_train_unet_number": None,
        "image_sizes": list(image_sizes),
        "text_encoder_name": "t5_small",
    }


def read_pth(path: Path) -> dict:
    """A MinImagen state dict, read with weights_only=True; anything needing pickle is refused.
    Zip-format files are memory-mapped, so a large Unet is not held twice while it is copied in."""
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor state dict that loads with "
            f"weights_only=True ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "re-save it as a state_dict of tensors"
        ) from error


def load_minimagen_run(run_dir: str | Path, text_encoder: str | Path | None, unets: int | None = None) -> Run:
    """Loads a MinImagen training directory (the layout above) with the T5 folder `text_encoder`.

    Parameters: the newest timestamp's imagen_params file and its unet_N_params files, one per
    image size. Weights per Unet: the best state dict in state_dicts/ (the lowest loss in its
    name where every candidate has one, else the newest), else the latest one in tmp/.

    MinImagen can train one Unet of the cascade at a time (imagen_params only_train_unet_number);
    its tmp/ then holds the other Unets' untrained starting weights, so they are not used. A Unet
    without weights is refused with a CheckpointError naming the missing file and the fix: copy
    that Unet's state dict from the directory that trained it into state_dicts/. `unets=K` loads
    only the first K Unets (base and K-1 super-resolution Unets): a complete, smaller cascade.
    Parameter files and weights that do not match (count, keys, shapes, text width) are refused
    with a CheckpointError naming the file.
    """
    run_dir = Path(run_dir)
    imagen_file, imagen_params, unet_files = _minimagen_parameters(run_dir)
    count = len(unet_files)
    if unets is not None and not (isinstance(unets, int) and 1 <= unets <= count):
        raise CheckpointError(
            f"unets must be between 1 and {count} (the Unets in {run_dir / 'parameters'}), got {unets!r}"
        )
    weights = _minimagen_weights(run_dir, imagen_params, count, unets or count)
    if text_encoder is None:
        raise CheckpointError(
            f"{run_dir} was trained with T5 {imagen_params.get('text_encoder_name', '?')!r}; "
            "pass --text-encoder PATH to a local folder with that T5 (config.json, weights, "
            "spiece.model)"
        )
    try:
        encoder = TextEncoder.from_folder(text_encoder, max_length=256)
    except TextEncoderError as error:
        raise CheckpointError(str(error)) from error
    width = imagen_params.get("text_embed_dim")
    if width is not None and width != encoder.embed_dim:
        raise CheckpointError(
            f"{imagen_file} gives text_embed_dim {width}; --text-encoder {text_encoder} has width "
            f"{encoder.embed_dim}: pass the T5 this directory was trained with"
        )
    config, configs = _minimagen_configs(imagen_file, imagen_params, unet_files[: len(weights)], encoder.embed_dim)
    imagen = Imagen(configs, config, encoder.embed_dim)
    for index, (unet, pth) in enumerate(zip(imagen.unets, weights)):
        _load_minimagen_unet(unet, pth, unet_files[index], index, text_encoder)
    source = {
        "parameters": [str(p.relative_to(run_dir)) for p in (imagen_file, *unet_files[: len(weights)])],
        "weights": [str(p.relative_to(run_dir)) for p in weights],
    }
    return Run(imagen, encoder, run_config(imagen, encoder, {"minimagen": source}), run_dir, "minimagen")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} is not a JSON object of parameters")
    return value


def _minimagen_parameters(run_dir: Path) -> tuple[Path, dict, list[Path]]:
    """(imagen_params file, its contents, unet_N_params files in order), all of one timestamp."""
    params = run_dir / "parameters"
    imagen_files, unet_files = {}, {}
    for file in sorted(params.glob("*.json")):
        match = _PARAMS.fullmatch(file.name)
        if match and match["index"] is None:
            imagen_files[match["stamp"] or ""] = file
        elif match:
            unet_files.setdefault(match["stamp"] or "", {})[int(match["index"])] = file
    if not imagen_files:
        raise CheckpointError(f"{params} has no imagen_params_*.json; is {run_dir} a MinImagen training directory?")
    stamp = max(imagen_files)  # files of several trainings: the newest (timestamps sort by time)
    imagen_file, found = imagen_files[stamp], unet_files.get(stamp, {})
    imagen_params = _read_json(imagen_file)
    sizes = imagen_params.get("image_sizes")
    sizes = [sizes] if isinstance(sizes, int) else sizes
    if not isinstance(sizes, list) or not sizes or not all(isinstance(s, int) for s in sizes):
        raise CheckpointError(f"{imagen_file} has no image_sizes list; it is not MinImagen's imagen_params file")
    imagen_params["image_sizes"] = sizes
    alone = imagen_params.get("only_train_unet_number")
    if alone is not None and (not isinstance(alone, int) or not 1 <= alone <= len(sizes)):
        raise CheckpointError(
            f"{imagen_file} gives only_train_unet_number {alone!r}; MinImagen numbers its Unets 1 to {len(sizes)}"
        )
    suffix = f"_{stamp}" if stamp else ""
    for index in range(len(sizes)):
        if index not in found:
            raise CheckpointError(
                f"{params / f'unet_{index}_params{suffix}.json'} is missing: {imagen_file.name} gives {len(sizes)} "
                f"image sizes {sizes}, one per Unet, and parameters/ has {len(found)} unet_N_params{suffix} files"
            )
    extra = sorted(set(found) - set(range(len(sizes))))
    if extra:
        raise CheckpointError(
            f"{found[extra[0]]} has no image size: {imagen_file.name} gives {len(sizes)} image "
            f"sizes {sizes} for {len(found)} Unet parameter files; give one size per Unet"
        )
    return imagen_file, imagen_params, [found[i] for i in range(len(sizes))]


def _candidates(run_dir: Path) -> dict[str, dict[int, list]]:
    """Per folder (state_dicts, tmp) and Unet index: [(rank, file)], the largest rank preferred."""
    found: dict[str, dict[int, list]] = {}
    for folder, (pattern, name) in _NAMES.items():
        for file in sorted((run_dir / folder).glob("unet_*.pth")):
            match = pattern.fullmatch(file.name)
            if match is None:
                raise CheckpointError(
                    f"{file} is not named as MinImagen names its {folder}/ weights ({name}); "
                    "rename it so its Unet is known, or move it out"
                )
            if folder == "state_dicts":
                loss = float(match["loss"]) if match["loss"] else None
                loss = float("inf") if loss is not None and loss != loss else loss  # a NaN loss is never the best
                rank = (loss, match["stamp"], int(match["epoch"] or 0))
            else:
                rank = (match["percent"] is None, int(match["percent"] or 0))
            found.setdefault(folder, {}).setdefault(int(match["index"]), []).append((rank, file))
    return found


def _best(candidates: list) -> Path:
    """MinImagen's choice: the lowest validation loss where every name has one, else the newest."""
    newest_first = sorted(candidates, key=lambda c: c[0][1:], reverse=True)  # so ties go to the newest
    if all(rank[0] is not None for rank, _ in candidates):
        return min(newest_first, key=lambda c: c[0][0])[1]
    return newest_first[0][1]


def _minimagen_weights(run_dir: Path, imagen_params: dict, count: int, wanted: int) -> list[Path]:
    """The weights file of each of the first `wanted` Unets (see load_minimagen_run)."""
    found = _candidates(run_dir)
    best, latest = found.get("state_dicts", {}), found.get("tmp", {})
    extra = sorted((set(best) | set(latest)) - set(range(count)))
    if extra:
        file = (best.get(extra[0]) or latest[extra[0]])[0][1]
        raise CheckpointError(
            f"{file} holds weights of unet {extra[0]}, but {run_dir / 'parameters'} describes "
            f"{count} Unets (unet_0 .. unet_{count - 1}); this file belongs to another training"
        )
    alone = imagen_params.get("only_train_unet_number")
    chosen: dict[int, Path] = {}
    for index in range(count):
        if index in best:
            chosen[index] = _best(best[index])
        elif index in latest and alone in (None, index + 1):
            chosen[index] = max(latest[index], key=lambda c: c[0])[1]
    missing = [i for i in range(wanted) if i not in chosen]
    if missing:
        raise CheckpointError(_missing_message(run_dir, missing[0], alone, chosen, count))
    return [chosen[i] for i in range(wanted)]


def _missing_message(run_dir: Path, index: int, alone, chosen: dict, count: int) -> str:
    message = (
        f"{run_dir / 'state_dicts' / f'unet_{index}_state_<timestamp>.pth'} is missing: unet {index} of "
        f"{count} has no weights in state_dicts/{'' if alone else ' or tmp/'}"
    )
    if alone is not None:
        message += (
            f" (this directory trained unet {alone - 1} alone, only_train_unet_number={alone}; its tmp/ "
            "copies of the other Unets are their untrained starting weights)"
        )
    message += (
        f". Copy unet {index}'s state dict from the training directory that trained it into "
        f"{run_dir / 'state_dicts'}/ (as unet_{index}_state_<timestamp>.pth)"
    )
    prefix = next(i for i in range(count + 1) if i not in chosen)
    if prefix:
        message += (
            f", or take the complete cascade of its first {prefix} Unet(s): imagen-export --unets {prefix} "
            f"(load_minimagen_run(..., unets={prefix}))"
        )
    return message


def _minimagen_configs(
    imagen_file: Path, imagen_params: dict, unet_files: list[Path], embed_dim: int
) -> tuple[ImagenConfig, list[UnetConfig]]:
    """The cascade's config and each Unet's, checked by building them on the meta device (no memory)."""
    from .diffusion import make_betas
    from .imagen import cast_unet_config
    from .unet import Unet

    count, timesteps = len(unet_files), imagen_params.get("timesteps", 1000)
    try:
        config = ImagenConfig(
            image_sizes=tuple(imagen_params["image_sizes"][:count]),
            timesteps=tuple(timesteps[:count]) if isinstance(timesteps, list) else timesteps,
            channels=imagen_params.get("channels", 3),
            cond_drop_prob=imagen_params.get("cond_drop_prob", 0.1),
            lowres_sample_noise_level=imagen_params.get("lowres_sample_noise_level", 0.2),
            dynamic_thresholding_percentile=imagen_params.get("dynamic_thresholding_percentile", 0.9),
        )
        for steps in config.timesteps_per_unet():
            make_betas(config.schedule, steps)
        if list(config.image_sizes) != sorted(set(config.image_sizes)):
            raise ValueError(f"image_sizes must increase from Unet to Unet, got {list(config.image_sizes)}")
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{imagen_file}: {error}") from error
    configs = []
    for index, file in enumerate(unet_files):
        try:
            unet_config = UnetConfig.from_dict({**_read_json(file), "max_text_len": 256})  # MinImagen's fixed length
            with torch.device("meta"):
                Unet(cast_unet_config(unet_config, index, embed_dim, config.channels))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{file}: {error}") from error
        configs.append(unet_config)
    return config, configs


def _load_minimagen_unet(unet: torch.nn.Module, pth: Path, params_file: Path, index: int, text_encoder) -> None:
    state = read_pth(pth)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{pth} is not a state dict of tensors (MinImagen saves unet.state_dict())")
    expected = unet.state_dict()
    width = state.get("text_to_cond.weight")
    if width is not None and width.ndim == 2 and width.shape[1] != expected["text_to_cond.weight"].shape[1]:
        raise CheckpointError(
            f"{pth} was trained on text embeddings of width {width.shape[1]}; --text-encoder "
            f"{text_encoder} gives {expected['text_to_cond.weight'].shape[1]}: pass the T5 this "
            "directory was trained with"
        )
    problems = [f"missing {k}" for k in expected if k not in state][:3]
    problems += [f"unexpected {k}" for k in state if k not in expected][:3]
    problems += [
        f"{k} is {tuple(state[k].shape)} where the parameters give {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ][:3]
    if problems:
        raise CheckpointError(
            f"{pth} does not fit unet {index} as {params_file} describes it: "
            f"{'; '.join(problems)}. The weights and the parameters come from different trainings"
        )
    unet.load_state_dict(state, strict=True)
