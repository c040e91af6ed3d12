"""The bundle contract (docs/bundle.md): what `imagen-export` writes and the runtime reads,
declared once. `signatures` holds the stage signatures and the names; `manifest` the typed
manifest.json. Standard library and NumPy only: `imagen.export` imports this package, the
runtime imports nothing from export.
"""

from .manifest import (
    Defaults,
    FileEntry,
    Manifest,
    Parity,
    ScheduleEntry,
    Source,
    StageEntry,
    TensorRTEntry,
    TokenizerEntry,
    run_config_sha256,
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
    "BATCH", "FORMAT", "FORMAT_VERSION", "LOWRES", "MANIFEST", "MAX_TOKEN_ID", "REEXPORT", "SUPPORTED_VERSIONS",
    "TEXT_ENCODER", "TOKENIZER_KINDS", "Defaults", "FileEntry", "Manifest", "Parity", "ScheduleEntry", "Source", "StageEntry",
    "StageSignature", "TensorRTEntry", "TensorSpec", "TokenizerEntry", "sha256_file", "stage_names",
    "text_encoder_signature", "unet_name", "unet_signature", "run_config_sha256",
]
