"""imagen-pytorch Unets -> ONNX, written by a child Python process.

imagen-pytorch cannot be a dependency of this project (its torchvision requirement replaces a CPU torch),
and importing it offline takes set-up that a process keeps (a stand-in `torchvision.transforms` while it
imports, a patched T5 config read, transformers' verbosity set globally). So the exporter never imports it
itself: `write_imagen_pytorch_unets` writes a job file, runs `python -m imagen.export.imagen_pytorch_onnx
JOB` with the same interpreter, relays the child's progress lines and reads back the stage entries the
child wrote. The child (`main`) reads the checkpoint (`read_imagen_pytorch`, which needs no imagen_pytorch),
imports imagen_pytorch (`import_imagen_pytorch`), rebuilds each Unet with its weights and writes its ONNX
file with the shared `write_stage`, one Unet at a time.

`ImagenPytorchUnetStage` gives an `imagen_pytorch.Unet` this project's signature. imagen-pytorch drops the
text per call (`cond_drop_prob`, drawn inside `Unet.forward` by `prob_mask_like`); the stage takes the
per-row boolean `text_keep` instead, so that guidance runs cond and uncond rows in one engine call: a kept
row is the Unet with `cond_drop_prob=0`, a dropped row the Unet with `cond_drop_prob=1`.
"""

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections import deque
from pathlib import Path

from torch import nn

from imagen.runtime.contract import StageEntry, unet_signature

from .errors import ExportError
from .imagen_pytorch import read_imagen_pytorch
from .options import ExportOptions
from .staging import Stage, write_stage

PROGRESS = "progress: "  # the child's lines for the user; anything else it prints is kept for errors
TAIL_LINES = 20  # of the child's output, in the error when it fails
EXPORT_FAILED, MISSING = 3, 4  # child exit codes: an ExportError (in the result file), imagen_pytorch absent
OPTION_FIELDS = ("fp16", "opset", "external_data_threshold", "force")  # the ExportOptions write_stage reads
WORK = ".imagen_pytorch"  # the job's folder in the staging folder, removed when the child is done
INSTALL = (
    "install imagen-pytorch 2.1.0 beside this project: with a CPU torch, `pip install --no-deps "
    "imagen-pytorch==2.1.0` and `pip install 'imagen-cascade[imagen-pytorch]'` (what it imports; its own "
    "torchvision requirement would replace the CPU torch); with a CUDA torch, `pip install imagen-pytorch==2.1.0`"
)
# d_model of the T5 v1.1 encoders, by the name's last part (google/t5-v1_1-base, ...)
T5_WIDTHS = {"small": 512, "base": 768, "large": 1024, "xl": 2048, "xxl": 4096}


# --- the stage (child side)


@contextlib.contextmanager
def text_kept(unet: nn.Module, text_keep):
    """Within the block, imagen-pytorch's Unet keeps the text of the rows where `text_keep` (b,) is true
    and swaps in its null text elsewhere: its `prob_mask_like`, which draws the rows to keep, answers
    `text_keep` instead. Restored after, also on errors."""
    namespace = type(unet).forward.__globals__  # the module globals Unet.forward looks names up in
    draw = namespace["prob_mask_like"]
    namespace["prob_mask_like"] = lambda shape, prob, device: text_keep
    try:
        yield
    finally:
        namespace["prob_mask_like"] = draw


class ImagenPytorchUnetStage(nn.Module):
    """An `imagen_pytorch.Unet` with positional inputs in `unet_signature` order: x, time, text_embeds,
    text_mask, text_keep, then self_cond (a self-conditioned Unet) and lowres_cond_img, lowres_noise_times
    (a super-resolution Unet). `time` and `lowres_noise_times` are fed as given (Imagen's log-SNR,
    ElucidatedImagen's c_noise); the output is the Unet's (b, c, s, s). A super-resolution Unet without
    self-conditioning takes its low-res inputs sixth and seventh: `unet_stage` picks the class."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        if unet.lowres_cond and not unet.self_cond and type(self) is ImagenPytorchUnetStage:
            raise ExportError(
                "a super-resolution Unet without self_cond takes no self_cond: wrap it with unet_stage(unet)"
            )
        self.unet = unet

    def forward(
        self, x, time, text_embeds, text_mask, text_keep, self_cond=None, lowres_cond_img=None, lowres_noise_times=None
    ):
        with text_kept(self.unet, text_keep):
            return self.unet(
                x,
                time,
                text_embeds=text_embeds,
                text_mask=text_mask,
                self_cond=self_cond,
                lowres_cond_img=lowres_cond_img,
                lowres_noise_times=lowres_noise_times,
            )


class ImagenPytorchSRUnetStage(ImagenPytorchUnetStage):
    """A super-resolution Unet without self-conditioning: no self_cond input."""

    def forward(self, x, time, text_embeds, text_mask, text_keep, lowres_cond_img, lowres_noise_times):
        return super().forward(x, time, text_embeds, text_mask, text_keep, None, lowres_cond_img, lowres_noise_times)


def unet_stage(unet: nn.Module) -> ImagenPytorchUnetStage:
    """The stage whose positional inputs are those of `unet_signature` for this Unet."""
    return (ImagenPytorchSRUnetStage if unet.lowres_cond and not unet.self_cond else ImagenPytorchUnetStage)(unet)


# --- importing imagen_pytorch offline (child side)


def t5_config_offline(name: str, from_pretrained, *args, **kwargs):
    """The T5 config from the local cache only; not there, a T5 v1.1 config of the name's width. imagen-pytorch
    reads it when imported, for a default text width that the exporter always overrides (text_embed_dim)."""
    from transformers import T5Config

    try:
        return from_pretrained(name, *args, **{**kwargs, "local_files_only": True})
    except OSError:
        width = T5_WIDTHS.get(str(name).rsplit("-", 1)[-1])
        if width is None:
            raise
        return T5Config(d_model=width, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@contextlib.contextmanager
def _t5_config_offline():
    from transformers import T5Config

    own = vars(T5Config).get("from_pretrained")  # the class's own descriptor, if any (else inherited)
    original = T5Config.from_pretrained
    T5Config.from_pretrained = classmethod(lambda cls, name, *a, **kw: t5_config_offline(name, original, *a, **kw))
    try:
        yield
    finally:
        if own is not None:
            T5Config.from_pretrained = own
        else:
            del T5Config.from_pretrained


def import_imagen_pytorch():
    """imagen_pytorch, imported without the network and, where torchvision cannot be imported, with a
    stand-in `torchvision.transforms` while it imports (imagen-pytorch uses it only for
    `sample(return_pil_images=True)`); the stand-in leaves sys.modules after, so that later imports see
    torchvision as absent again. ImportError when imagen-pytorch or what it imports is not installed."""
    import types

    # what looks for torchvision when imported goes first, so that each settles its absence
    import accelerate  # noqa: F401
    import datasets.utils.file_utils  # noqa: F401
    import kornia.augmentation  # noqa: F401
    from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: F401

    stand_in = {}
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # absent, or a CUDA build beside a CPU torch (RuntimeError)
        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToPILImage = None
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        stand_in = {"torchvision": torchvision, "torchvision.transforms": transforms}
    sys.modules.update(stand_in)
    try:
        with _t5_config_offline():
            import imagen_pytorch
    finally:
        for name, module in stand_in.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return imagen_pytorch


# --- the child


def _say(message: str) -> None:
    print(PROGRESS + message, flush=True)


def _write_json(path: Path, obj) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj, indent=1))
    os.replace(partial, path)


def _check_jobs(checkpoint, jobs: list[dict]) -> None:
    count = len(checkpoint.stages)
    for job in jobs:
        index = job["stage"]
        if not isinstance(index, int) or not 0 <= index < count:
            raise ExportError(f"{checkpoint.path} has {count} Unets; stage index {index!r} is not one of them")
        if not checkpoint.stages[index].cond_on_text:
            raise ExportError(
                f"{checkpoint.path}: Unet {index + 1} is not conditioned on text (condition_on_text=False); "
                "this project exports text-to-image cascades"
            )


def _export_unet(imagen_pytorch, stage, job: dict, staging: Path, options: ExportOptions) -> StageEntry:
    unet = imagen_pytorch.Unet(**stage.unet_params)
    unet.load_state_dict(stage.state_dict, strict=True)
    module = unet_stage(unet.eval().requires_grad_(False))
    signature = unet_signature(**job["signature"])
    image_size, lowres_cond = job["signature"]["image_size"], job["signature"]["lowres_cond"]
    return write_stage(Stage(signature, module, job["input_kwargs"], image_size, lowres_cond), staging, options, _say)


def main(argv: list[str] | None = None) -> int:
    """The child: `python -m imagen.export.imagen_pytorch_onnx JOB_JSON`. Writes the ONNX files to the job's
    staging folder and the stage entries (or an ExportError's message) to its result file; exits with
    MISSING when imagen_pytorch cannot be imported."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    staging, result = Path(job["staging"]), Path(job["result"])
    options = ExportOptions(**job["options"])
    try:
        checkpoint = read_imagen_pytorch(job["checkpoint"], **job["read_kwargs"])
        _check_jobs(checkpoint, job["stages"])
        try:
            imagen_pytorch = import_imagen_pytorch()
        except ImportError:
            traceback.print_exc()
            return MISSING
        entries = []
        for unet_job in job["stages"]:
            stage = checkpoint.stages[unet_job["stage"]]
            _say(f"Unet {stage.unet_number} of {checkpoint.path.name}: rebuilding it in imagen-pytorch")
            entry = _export_unet(imagen_pytorch, stage, unet_job, staging, options)
            entries.append({"name": entry.name, "entry": entry.to_json()})
            gc.collect()  # the Unet and its exported graphs go before the next is built
    except ExportError as error:
        _write_json(result, {"error": str(error)})
        return EXPORT_FAILED
    _write_json(result, {"stages": entries})
    return 0


# --- the parent


def child_command(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "imagen.export.imagen_pytorch_onnx", str(job_path)]


def _run_child(command: list[str], cwd: Path, say) -> tuple[int, list[str]]:
    """Runs the child in `cwd` (`-m` puts it on sys.path: the user's folder could shadow a package), relaying
    its progress lines to `say`; returns its exit code and its last lines."""
    tail = deque(maxlen=TAIL_LINES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(PROGRESS):
                say(line[len(PROGRESS) :])
        return process.wait(), list(tail)
    finally:
        if process.poll() is None:  # interrupted: the child goes too
            process.kill()
            process.wait()
        process.stdout.close()


def write_imagen_pytorch_unets(
    checkpoint_path: str | Path, read_kwargs: dict, jobs: list[dict], staging: Path, options: ExportOptions, say
) -> list[StageEntry]:
    """Writes the ONNX files of an imagen-pytorch checkpoint's Unets into `staging`, in a child process that
    imports imagen-pytorch; returns their stage entries in the order of `jobs`.

    `read_kwargs`: the keywords of `read_imagen_pytorch` (config, use_ema, allow_untested_version,
    allow_untrained). Each job: `stage` (0-based Unet index), `signature` (the keywords of `unet_signature`)
    and `input_kwargs` (of `sample_inputs`, e.g. `{"time_range": [-20.0, 10.0]}` for a log-SNR time).
    `options` gives fp16, opset, external_data_threshold and force; parity is measured, not enforced
    (`staging.check_parity` is the caller's)."""
    staging = Path(staging)
    work = staging / WORK
    work.mkdir(parents=True, exist_ok=True)
    job_path, result_path = work / "job.json", work / "result.json"
    job = dict(
        checkpoint=str(Path(checkpoint_path).resolve()),
        read_kwargs=read_kwargs,
        options={name: getattr(options, name) for name in OPTION_FIELDS},
        stages=jobs,
        staging=str(staging.resolve()),
        result=str(result_path.resolve()),
    )
    try:
        _write_json(job_path, job)
        code, tail = _run_child(child_command(job_path), work, say)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output = "\n".join(tail)
    if code == MISSING:
        last = next((line for line in reversed(tail) if line.strip()), "")
        raise ExportError(f"imagen_pytorch cannot be imported by {sys.executable} ({last}); {INSTALL}")
    if code == EXPORT_FAILED and "error" in result:
        raise ExportError(result["error"])
    if code != 0 or "stages" not in result:
        raise ExportError(
            f"exporting the Unets of {checkpoint_path} failed in the imagen-pytorch child process (exit code "
            f"{code}); its last lines:\n{output}\nFix what they name (a checkpoint or an imagen-pytorch install "
            "that does not match, or too little memory) and export again"
        )
    return [StageEntry.from_json(item["name"], item["entry"]) for item in result["stages"]]


if __name__ == "__main__":
    sys.exit(main())
