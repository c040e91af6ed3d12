"""DeepFloyd IF at tiny width, made offline: stage I and stage II folders in diffusers' layout
(`save_pretrained` of `IFPipeline` and `IFSuperResolutionPipeline`), with the Unet configs of
diffusers' own IF tests, the schedulers as diffusers' conversion script sets them, a small T5
encoder and a sentencepiece vocabulary trained here."""

import shutil
from pathlib import Path

IMAGE_SIZE = 32
EMBED_DIM = 32  # the T5 width, the Unets' encoder_hid_dim and cross_attention_dim
MAX_LENGTH = 77  # IF's tokenizer length
EXTRA_IDS = 100  # transformers' T5 default
SEED = 0

# diffusers tests/pipelines/deepfloyd_if/__init__.py, `_get_dummy_components`
STAGE_1_UNET = dict(
    sample_size=IMAGE_SIZE,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    in_channels=3,
    out_channels=6,
    cross_attention_dim=EMBED_DIM,
    encoder_hid_dim=EMBED_DIM,
    attention_head_dim=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=2,
    cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
    act_fn="gelu",
)
# `_get_superresolution_dummy_components`: 6 input channels, the noise level through class_labels; twice
# stage I's size here (diffusers' tests keep 32), so that the cascade upscales as IF's 64 -> 256 does
STAGE_2_UNET = {
    **STAGE_1_UNET,
    "sample_size": 2 * IMAGE_SIZE,
    "layers_per_block": (1, 2),
    "in_channels": 6,
    "class_embed_type": "timestep",
    "mid_block_scale_factor": 1.414,
    "time_embedding_act_fn": "gelu",
    "time_embedding_dim": 32,
}
# diffusers scripts/convert_if.py
SCHEDULER = dict(
    variance_type="learned_range",
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
)
STAGE_1_SAMPLE_MAX, STAGE_2_SAMPLE_MAX = 1.5, 1.0

CAPTIONS = [
    f"a {c} {s} on the {p} of a {b} background"
    for c in ("red", "blue", "green", "yellow")
    for s in ("circle", "square", "triangle")
    for p in ("left", "right", "top", "bottom")
    for b in ("white", "black")
]


def train_spiece(folder: Path) -> Path:
    """A small unigram sentencepiece vocabulary with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=48,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return folder / "spiece.model"


def _t5(spiece: Path):
    import sentencepiece as spm
    from transformers import T5EncoderModel, T5Tokenizer

    from imagen.reference.text_encoder import tiny_t5_config

    pieces = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
    encoder = T5EncoderModel(tiny_t5_config(vocab_size=pieces + EXTRA_IDS, d_model=EMBED_DIM, num_heads=4))
    # from the folder: transformers 5's T5Tokenizer(vocab_file=...) gives the extra ids wrong ids
    tokenizer = T5Tokenizer.from_pretrained(spiece.parent, extra_ids=EXTRA_IDS, model_max_length=MAX_LENGTH)
    return encoder.eval(), tokenizer


def _scheduler(sample_max_value: float):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER, sample_max_value=sample_max_value)


def _keep_spiece(folder: Path, spiece: Path) -> None:
    """Published IF folders carry tokenizer/spiece.model; transformers 5's save_pretrained may not write it."""
    target = folder / "tokenizer" / "spiece.model"
    if not target.is_file():
        shutil.copyfile(spiece, target)


def write_tiny_if(root: str | Path) -> tuple[Path, Path]:
    """Writes `root/IF-I` (IFPipeline: T5, tokenizer, Unet, scheduler) and `root/IF-II`
    (IFSuperResolutionPipeline: no text encoder, as the published IF-II folders); returns both."""
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    diffusers_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()
    root = Path(root)
    spiece = train_spiece(root / "vocabulary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        text_encoder, tokenizer = _t5(spiece)
        torch.manual_seed(SEED)
        unet_1 = UNet2DConditionModel(**STAGE_1_UNET)
        torch.manual_seed(SEED)
        unet_2 = UNet2DConditionModel(**STAGE_2_UNET)
    parts = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    stage_1, stage_2 = root / "IF-I", root / "IF-II"
    IFPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet_1,
        scheduler=_scheduler(STAGE_1_SAMPLE_MAX),
        **parts,
    ).save_pretrained(stage_1)
    _keep_spiece(stage_1, spiece)
    IFSuperResolutionPipeline(
        tokenizer=None,
        text_encoder=None,
        unet=unet_2,
        scheduler=_scheduler(STAGE_2_SAMPLE_MAX),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        **parts,
    ).save_pretrained(stage_2)
    return stage_1, stage_2
