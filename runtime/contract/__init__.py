"""The bundle contract (docs/bundle.md): what `imagen-export` writes and the runtime reads,
declared once. `signatures` holds the stage signatures and the names; `manifest` the typed
manifest.json, and `entries` its small records and field readers. Standard library and NumPy
only: `imagen.export` imports this package, the runtime imports nothing from export.
"""

from .entries import FileEntry, Parity, ScheduleEntry, Source, TensorRTEntry, run_config_sha256
from .manifest import Defaults, Manifest, StageEntry, TokenizerEntry
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
]
