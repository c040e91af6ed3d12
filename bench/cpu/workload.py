"""What the sections ask of the runtime: the prompts, and every call they make into it, all
through its public API (Pipeline.load, Pipeline.settings, Pipeline.bundle, the request
itself, load_bundle)."""

from pathlib import Path

from imagen.runtime.contract import run_config_sha256

from ..prompts import prompts_for

REPO = Path(__file__).resolve().parents[2]


def load_pipeline(bundle, threads: int):
    from imagen.runtime import Pipeline

    return Pipeline.load(bundle, backend="onnxruntime", threads=threads)


def resolve_settings(pipe, *, sampler=None, steps=None, seed: int = 0):
    """The request's settings with the bundle's defaults filled in (so a report names them)."""
    return pipe.settings(steps=steps, sampler=sampler, seed=seed)


def generate(pipe, prompts: list[str], settings):
    """One request with exactly these settings."""
    return pipe(
        prompts,
        sampler=settings.sampler,
        steps=list(settings.steps),
        guidance_scale=settings.guidance_scale,
        eta=settings.eta,
        sr_strength=settings.sr_strength,
        seed=settings.seed,
    )


def warm(pipe, seed: int = 0) -> None:
    """A one-step request: allocators, thread pools and first-call graph work, before timing."""
    pipe(prompts_for(1), sampler="ddim", steps=1, seed=seed)


def input_shape(signature, name: str) -> tuple:
    """The declared shape of one input of a stage signature (ints, and "batch")."""
    return next(spec.shape for spec in signature.inputs if spec.name == name)


def unet_stages(bundle) -> list[tuple[str, object]]:
    """(stage name, stage entry) of each Unet of a loaded bundle, base first."""
    return [(stage.signature.name, stage) for stage in bundle.unets]


def bundle_source(bundle) -> tuple[str | None, str | None]:
    """The run a loaded bundle was exported from, as its manifest names it (the recorded path, else the
    run's folder name), and the weights taken."""
    source = bundle.manifest.source
    if source is None:
        return None, None
    return source.checkpoint or source.name, source.weights


def same_run(source, run_dir) -> bool | None:
    """Whether `run_dir` is the run a manifest's `source` names: same config hash when one is recorded,
    else the same recorded path; None when the manifest records neither. A config hash tells the
    configuration, not which of the run's checkpoints was exported (`source.weights` says that)."""
    if source is not None and source.config_sha256:
        try:
            return run_config_sha256(run_dir) == source.config_sha256
        except OSError:
            return False
    if source is not None and source.checkpoint:
        return Path(source.checkpoint).resolve() == Path(run_dir).resolve()
    return None


def default_run_dir(bundle_dir: Path) -> Path | None:
    """The run a bundle came from: among runs/<source name> and runs/demo (here, in the repository or
    beside it) and the recorded path, the first whose config hash is the manifest's; else the first
    of those that exists (the report then says the runs differ)."""
    from imagen.runtime.bundle import read_manifest
    from imagen.runtime.errors import BundleError

    try:
        source = read_manifest(bundle_dir)[2].source
    except BundleError:
        source = None
    names = [source.name] if source is not None and source.name else []
    candidates = [base / "runs" / name for name in [*names, "demo"] for base in (Path("."), REPO, REPO.parent)]
    if source is not None and source.checkpoint:
        candidates.insert(0, Path(source.checkpoint))
    runs = [c for c in dict.fromkeys(candidates) if (c / "config.json").is_file()]
    return next((c for c in runs if same_run(source, c)), runs[0] if runs else None)
