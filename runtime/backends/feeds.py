"""What a stage takes: the feed check every backend runs first, the inputs that stay the same for a
whole sampling loop, and the shapes TensorRT engines are built and tuned for.

Both backends check the feeds against the stage signature before anything else and raise
SignatureError, so a wrong array never reaches an engine.
"""

from ..arrays import dtype_name, is_array
from ..contract import BATCH, StageSignature
from ..errors import SignatureError

# A Unet's inputs that change at every sampler step. Its others (text_embeds, text_mask, text_keep,
# lowres_cond_img, lowres_noise_times) are the same arrays for a whole loop: GuidedDenoiser makes
# them once and feeds those very objects at every step.
STEP_INPUTS = ("x", "time")


def check_feeds(stage: StageSignature, feeds: dict) -> int:
    """The batch size of `feeds` if they match the signature, else SignatureError naming what differs."""
    if not isinstance(feeds, dict):
        raise SignatureError(f"{stage.name}: feeds must be a dict of name -> array, got {type(feeds).__name__}")
    names = stage.input_names
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        raise SignatureError(f"{stage.name}: inputs are {names}; missing {missing}, unexpected {extra}")
    batch = None
    for spec in stage.inputs:
        array = feeds[spec.name]
        if not is_array(array):
            raise SignatureError(f"{stage.name}: input {spec.name} must be an array, got {type(array).__name__}")
        if dtype_name(array) != spec.dtype:
            raise SignatureError(f"{stage.name}: input {spec.name} must be {spec.dtype}, got {dtype_name(array)}")
        if array.ndim != len(spec.shape):
            raise SignatureError(
                f"{stage.name}: input {spec.name} must have rank {len(spec.shape)} "
                f"{list(spec.shape)}, got shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=False)):
            if want == BATCH:
                if batch is None:
                    batch = got
                elif got != batch:
                    raise SignatureError(f"{stage.name}: input {spec.name} has batch {got}, other inputs have {batch}")
            elif want != got:
                raise SignatureError(
                    f"{stage.name}: input {spec.name} dimension {axis} must be {want}, got {got} "
                    f"(shape {list(array.shape)}, expected {list(spec.shape)})"
                )
    batch = 1 if batch is None else batch
    if not 1 <= batch <= stage.batch_max:
        raise SignatureError(f"{stage.name}: batch {batch} is outside [1, {stage.batch_max}] (the bundle's max batch)")
    return batch


def engine_profile(stage: StageSignature) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max shape of each input, for the TensorRT optimization profile of an engine (built by
    imagen-export, or by ONNX Runtime's TensorRT provider): batch 1 to the stage's largest, tuned
    (opt) for the largest. That is the batch a busy server runs: imagen-serve and the Ray app gather
    requests up to the bundle's max batch, the text encoder encodes all their prompts at once, and a
    Unet runs each image's cond and uncond rows together (2 x max batch). Other batches run on the
    same kernels. (The signature's own batch_opt, 2 for a Unet, is one image with guidance.)"""
    low, opt, high = stage.batch_min, stage.batch_max, stage.batch_max
    return {spec.name: (spec.concrete(low), spec.concrete(opt), spec.concrete(high)) for spec in stage.inputs}
