"""Training inputs made in seconds: the tiny run's settings, a tiny T5 folder and a training
directory in MinImagen's layout."""

import json
from pathlib import Path

from imagen.reference.minimagen import minimagen_imagen_params

# The tiny trained run shared by the session (conftest.py's `tiny_run`) and the training tests.
TINY = dict(
    image_sizes=(16, 32),
    timesteps=30,
    batch_size=4,
    steps=6,
    checkpoint_every=3,
    val_every=3,
    val_batches=1,
    sample_every=0,
    max_length=24,
    seed=0,
    progress=False,
    unet_overrides={"layer_attns": (False, True), "layer_cross_attns": (False, True)},
)


# MinImagen's imagen_params_<timestamp>.json for the tests' 16 -> 32 cascade.
MINIMAGEN_PARAMS = minimagen_imagen_params([16, 32], timesteps=25)


def write_minimagen_directory(root, t5_folder):
    """A training directory in MinImagen's layout, with state dicts whose names and shapes are
    those of MinImagen's own modules (tests/data, recorded from its Unet)."""
    import torch

    keys = json.loads((Path(__file__).parent / "data" / "minimagen_state_dict_keys.json").read_text())
    params = root / "parameters"
    params.mkdir(parents=True)
    (root / "state_dicts").mkdir()
    (root / "tmp").mkdir()
    stamp = "20220816_165729"
    (params / f"imagen_params_{stamp}.json").write_text(json.dumps(MINIMAGEN_PARAMS))
    generator = torch.Generator().manual_seed(0)
    for index, case in enumerate(("base_attn", "super_me")):
        config = {k: v for k, v in keys[case]["config"].items()}
        config.update(channels=3, channels_out=None, cond_dim=None, lowres_cond=False)
        (params / f"unet_{index}_params_{stamp}.json").write_text(json.dumps(config))
        state = {k: torch.randn(shape, generator=generator) * 0.05 for k, shape in keys[case]["state_dict"].items()}
        # MinImagen keeps a best state dict per Unet, or only a tmp one before the first validation.
        target = (
            root / "state_dicts" / f"unet_{index}_state_{stamp}_0.5.pth"
            if index == 0
            else root / "tmp" / f"unet_{index}_tmp.pth"
        )
        torch.save(state, target)


def tiny_t5_folder(path, embed_dim=32):
    import sentencepiece as spm

    text = path / "corpus.txt"
    text.write_text(
        "\n".join(
            f"a {c} {s} on the {p}"
            for c in ("red", "blue", "green")
            for s in ("circle", "square")
            for p in ("left", "right")
        )
        * 5
    )
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(path / "spiece"),
        vocab_size=24,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    from transformers import T5EncoderModel

    from imagen.reference.text_encoder import tiny_t5_config

    folder = path / "t5"
    T5EncoderModel(tiny_t5_config(vocab_size=24, d_model=embed_dim)).save_pretrained(folder)
    (path / "spiece.model").rename(folder / "spiece.model")
    return folder
