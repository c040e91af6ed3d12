"""imagen-train's sample grids: a few-step sampler by default, options to change it, on new and resumed runs."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imagen.reference.cli import main as train_cli
from imagen.reference.imagen import Imagen
from imagen.reference.samplers import spaced_timesteps
from imagen.reference.train import TrainConfig, train

from runs import TINY

# One grid after one step; one prompt keeps it cheap (two Unet rows per call with guidance).
PREVIEW = dict(TINY, steps=1, checkpoint_every=1, val_every=1, sample_every=1, sample_prompts=("a red circle",))


@pytest.fixture
def grid_calls(monkeypatch):
    """Each `Imagen.sample` call of a run: its arguments, the noise state it started from and the
    timesteps each Unet was called at (one Unet call per sampler step)."""
    calls, original = [], Imagen.sample

    def sample(self, text_embeds, text_mask, **kwargs):
        timesteps = [[] for _ in self.unets]
        state = kwargs["noise"].bit_generator.state
        calls.append({"kwargs": kwargs, "noise_state": state, "timesteps": timesteps})
        return original(
            self, text_embeds, text_mask, **kwargs, callback=lambda unet, step, t, x: timesteps[unet].append(t)
        )

    monkeypatch.setattr(Imagen, "sample", sample)
    return calls


def _grid_size(path):
    with Image.open(path) as image:
        return image.size


def test_grid_uses_dpmpp_2m_at_25_steps_per_unet_and_the_seeded_noise(tmp_path, grid_calls):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), **PREVIEW))
    assert len(grid_calls) == 1
    call = grid_calls[0]
    assert call["kwargs"]["sampler"] == "dpmpp_2m" and call["kwargs"]["steps"] == (25, 25)
    assert call["timesteps"] == [spaced_timesteps(30, 25)] * 2  # TINY trains T = 30 timesteps per Unet
    assert call["noise_state"] == np.random.default_rng(TINY["seed"]).bit_generator.state
    assert _grid_size(out / "samples" / "step_0000001.png") == (32, 32)
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert recorded["preview_sampler"] == "dpmpp_2m" and recorded["preview_steps"] == 25


def test_options_are_honoured_recorded_capped_and_apply_on_resume(tmp_path, grid_calls):
    out = tmp_path / "run"
    small = dict(PREVIEW, schedule="cosine", timesteps=6)
    train(TrainConfig(out=str(out), **dict(small, preview_sampler="ddpm", preview_steps=40)))
    first = grid_calls[0]
    assert first["kwargs"]["sampler"] == "ddpm" and first["kwargs"]["steps"] == (6, 6)  # capped at T = 6
    assert first["timesteps"] == [[5, 4, 3, 2, 1, 0]] * 2
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert recorded["preview_sampler"] == "ddpm" and recorded["preview_steps"] == 40

    train(TrainConfig(out=str(out), **dict(small, steps=2, preview_sampler="ddim", preview_steps=3), resume=True))
    assert len(grid_calls) == 2
    resumed = grid_calls[1]
    assert resumed["kwargs"]["sampler"] == "ddim" and resumed["kwargs"]["steps"] == (3, 3)
    assert resumed["timesteps"] == [[5, 2, 0]] * 2
    assert resumed["noise_state"] == np.random.default_rng(TINY["seed"]).bit_generator.state
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]


def test_cli_passes_the_preview_options(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("imagen.reference.cli.train", lambda config: seen.append(config) or {})
    runner = CliRunner()
    result = runner.invoke(train_cli, ["--out", str(tmp_path / "a"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (seen[0].preview_sampler, seen[0].preview_steps) == ("dpmpp_2m", 25)
    result = runner.invoke(
        train_cli, ["--out", str(tmp_path / "b"), "--quiet", "--preview-sampler", "ddim", "--preview-steps", "7"]
    )
    assert result.exit_code == 0, result.output
    assert (seen[1].preview_sampler, seen[1].preview_steps) == ("ddim", 7)


@pytest.mark.parametrize(
    "option, value", [("--preview-sampler", "euler"), ("--preview-steps", "0"), ("--preview-steps", "-3")]
)
def test_cli_rejects_a_bad_preview_option_in_one_line(tmp_path, option, value):
    result = CliRunner().invoke(train_cli, ["--out", str(tmp_path / "r"), option, value])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagen-train: error:") and option in lines[0], result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"preview_sampler": "euler"}, "preview_sampler must be one of"),
        ({"preview_steps": 0}, "preview_steps must be a positive integer"),
    ],
)
def test_train_rejects_bad_preview_settings_before_writing(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(out=str(tmp_path / "r"), **dict(PREVIEW, **change)))
    assert not (tmp_path / "r").exists()
