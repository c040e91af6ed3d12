"""What the sections ask of the runtime: the prompts, and every call they make into it, all
through its public API (Pipeline.load, Pipeline.settings, Pipeline.bundle, the request
itself, load_bundle)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle at the bottom",
    "a small yellow circle on the right",
    "a large red square",
    "a blue triangle on the left",
    "a green circle at the top",
    "a large yellow triangle",
]


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


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
    """The run directory and weights a loaded bundle was exported from, as its manifest records them."""
    source = bundle.manifest.source
    if source is None:
        return None, None
    return source.checkpoint, source.weights


def default_run_dir(bundle_dir: Path) -> Path | None:
    """The run a bundle came from: runs/demo here or in the repository, else the manifest's source."""
    candidates = [Path("runs/demo"), REPO / "runs" / "demo", REPO.parent / "runs" / "demo"]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is not None:
        return found
    from imagen.runtime.bundle import load_bundle

    checkpoint, _ = bundle_source(load_bundle(bundle_dir))
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        return Path(checkpoint)
    return None
