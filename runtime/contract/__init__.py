"""The bundle contract (docs/bundle.md): what `imagen-export` writes and the runtime reads,
declared once. `signatures` holds the stage signatures and the names; `manifest` the typed
manifest.json, `entries` its small records and field readers, `sampling` how a Unet stage is sampled, and `settings` a request's
sampling settings with every range check. Standard library, NumPy and `imagen.runtime.errors`
only (DESIGN.md, Layers): `imagen.export` imports this package, the runtime imports nothing
from export.
"""

from .entries import FileEntry, Parity, ScheduleEntry, Source, TensorRTEntry, run_config_sha256
from .manifest import Defaults, Manifest, StageEntry, TokenizerEntry
from .sampling import SamplingEntry
from .settings import (
    MAX_SEED,
    SAMPLER_NAMES,
    Settings,
    check_eta,
    check_guidance_scale,
    check_sampler,
    check_seed,
    check_sr_strength,
    check_steps,
    check_steps_per_unet,
    is_int,
    is_number,
)
from .signatures import (
    BATCH,
    FORMAT,
    FORMAT_VERSION,
    LOWRES,
    MANIFEST,
    MAX_TOKEN_ID,
    REEXPORT,
    SUPPORTED_VERSIONS,
    TEXT_ENCODER,
    TOKENIZER_KINDS,
    StageSignature,
    TensorSpec,
    sha256_file,
    stage_names,
    text_encoder_signature,
    unet_name,
    unet_signature,
)

__all__ = [
    "BATCH",
    "FORMAT",
    "FORMAT_VERSION",
    "LOWRES",
    "MANIFEST",
    "MAX_TOKEN_ID",
    "REEXPORT",
    "SUPPORTED_VERSIONS",
    "TEXT_ENCODER",
    "TOKENIZER_KINDS",
    "Defaults",
    "FileEntry",
    "Manifest",
    "Parity",
    "SamplingEntry",
    "ScheduleEntry",
    "Source",
    "StageEntry",
    "StageSignature",
    "TensorRTEntry",
    "TensorSpec",
    "TokenizerEntry",
    "sha256_file",
    "stage_names",
    "text_encoder_signature",
    "unet_name",
    "unet_signature",
    "run_config_sha256",
    "MAX_SEED",
    "SAMPLER_NAMES",
    "Settings",
    "check_eta",
    "check_guidance_scale",
    "check_sampler",
    "check_seed",
    "check_sr_strength",
    "check_steps",
    "check_steps_per_unet",
    "is_int",
    "is_number",
]
