"""DeepFloyd IF folders -> ONNX stages: the facts `read_if_folder` reads from a tiny IF cascade saved
by diffusers, every folder it refuses (the error names the field), and the exported Unets and T5
encoder on ONNX Runtime against diffusers' Unet and transformers' T5 encoder in PyTorch.

FP32 tolerance, per output and batch size: relative L2 error (export.parity.relative_error) at most
1e-5 and max abs error at most 1e-4 of the reference's largest magnitude. Measured here: Unets about
1e-6 relative, T5 about 1e-7; a wrong graph is off by O(1).
"""

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from deepfloyd_tiny import EMBED_DIM, IMAGE_SIZE, write_tiny_if

from imagen.export.deepfloyd import (
    DDPM_DEFAULTS,
    MAX_LENGTH,
    NOISE_LEVEL,
    STAGE_1,
    STAGE_2,
    STAGE_DEFAULTS,
    check_if_cascade,
    read_if_folder,
)
from imagen.export.deepfloyd_onnx import export_if_text_encoder, export_if_unet, load_if_text_encoder, load_if_unet
from imagen.export.errors import ExportError
from imagen.export.parity import relative_error

REL_TOLERANCE, MAX_ABS_FRACTION = 1e-5, 1e-4
MAX_BATCH = 2  # the Unets run up to 2 * MAX_BATCH rows (cond + uncond)
BATCHES = (1, 2, 4)
PROMPTS = ["a red circle on the left", "", "A Blue Square On The Top Of A White Background", "green " * 100]


@pytest.fixture(scope="module")
def tiny_if(tmp_path_factory):
    return write_tiny_if(tmp_path_factory.mktemp("deepfloyd"))


@pytest.fixture(scope="module")
def exported(tiny_if, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepfloyd_onnx")
    stage_1, stage_2 = (read_if_folder(folder) for folder in tiny_if)
    files = {
        # stage I with its weights in external data, as the real-size Unets are written
        "unet_0": export_if_unet(stage_1, out / "unet_0.onnx", MAX_BATCH, external_data_threshold=0),
        "unet_1": export_if_unet(stage_2, out / "unet_1.onnx", MAX_BATCH),
        "text_encoder": export_if_text_encoder(tiny_if[0], out / "text_encoder.onnx", max(BATCHES)),
    }
    assert [p.name for p in files["unet_0"]] == ["unet_0.onnx", "unet_0.onnx.data"]
    assert [len(paths) for paths in files.values()] == [2, 1, 1]
    return {name: paths[0] for name, paths in files.items()}


def session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_close(name, got, expected):
    expected = np.asarray(expected, np.float64)
    rel, max_abs = relative_error(got, expected), float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    print(f"{name}: relative error {rel:.2e}, max abs error {max_abs:.2e} (scale {scale:.2f})")
    assert got.shape == expected.shape
    assert rel <= REL_TOLERANCE and max_abs <= MAX_ABS_FRACTION * scale, (rel, max_abs, scale)


# --- the folder's facts


def test_stage_1_facts(tiny_if):
    stage = read_if_folder(tiny_if[0])
    assert (stage.pipeline_class, stage.lowres_cond, stage.index) == (STAGE_1, False, 0)
    assert (stage.image_size, stage.channels, stage.in_channels, stage.out_channels) == (IMAGE_SIZE, 3, 3, 6)
    assert (stage.cross_attention_dim, stage.encoder_hid_dim, stage.embed_dim) == (EMBED_DIM, EMBED_DIM, EMBED_DIM)
    assert stage.learned_variance and stage.has_text_encoder and stage.max_length == MAX_LENGTH == 77
    assert (stage.steps, stage.guidance_scale, stage.noise_level, stage.clean_caption) == (100, 7.0, None, True)
    s = stage.schedule
    assert (s.num_train_timesteps, s.beta_schedule, s.variance_type, s.prediction_type) == (
        1000,
        "squaredcos_cap_v2",
        "learned_range",
        "epsilon",
    )
    assert (s.thresholding, s.dynamic_thresholding_ratio, s.sample_max_value) == (True, 0.95, 1.5)
    assert (s.timestep_spacing, s.steps_offset, s.clip_sample, s.clip_sample_range) == ("leading", 0, True, 1.0)
    assert stage.noising_schedule is None
    names = stage.signature(MAX_BATCH).input_names
    assert names == ["x", "time", "text_embeds"]
    assert stage.signature(MAX_BATCH).output_names == ["noise_pred", "variance_pred"]


def test_stage_2_facts(tiny_if):
    stage = read_if_folder(tiny_if[1])
    assert (stage.pipeline_class, stage.lowres_cond, stage.index) == (STAGE_2, True, 1)
    assert (stage.image_size, stage.channels, stage.in_channels, stage.out_channels) == (2 * IMAGE_SIZE, 3, 6, 6)
    assert stage.embed_dim == EMBED_DIM and stage.learned_variance and not stage.has_text_encoder
    assert (stage.steps, stage.guidance_scale, stage.noise_level) == (50, 4.0, NOISE_LEVEL) == (50, 4.0, 250)
    assert (stage.schedule.sample_max_value, stage.schedule.thresholding) == (1.0, True)
    noising = stage.noising_schedule
    assert (noising.beta_schedule, noising.num_train_timesteps) == ("squaredcos_cap_v2", 1000)
    signature = stage.signature(MAX_BATCH)
    assert signature.input_names == ["x", "time", "text_embeds", "lowres_cond_img", "lowres_noise_times"]
    assert signature.inputs[3].shape == ("batch", 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    check_if_cascade(read_if_folder(tiny_if[0]), stage)


def test_defaults_are_diffusers_own():
    """The scheduler defaults filled in for older configs and the pipelines' call defaults, read
    from diffusers' signatures."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    ddpm = inspect.signature(DDPMScheduler.__init__).parameters
    assert DDPM_DEFAULTS == {name: p.default for name, p in ddpm.items() if name != "self"}
    for cls in (IFPipeline, IFSuperResolutionPipeline):
        call = inspect.signature(cls.__call__).parameters
        steps, guidance = STAGE_DEFAULTS[cls.__name__]
        assert (call["num_inference_steps"].default, call["guidance_scale"].default) == (steps, guidance)
        assert call["clean_caption"].default is True
    assert inspect.signature(IFSuperResolutionPipeline.__call__).parameters["noise_level"].default == NOISE_LEVEL


def test_betas_are_the_schedulers(tiny_if):
    from diffusers import DDPMScheduler

    for folder in tiny_if:
        stage = read_if_folder(folder)
        schedules = [("scheduler", stage.schedule), ("image_noising_scheduler", stage.noising_schedule)]
        for component, schedule in schedules:
            if schedule is not None:
                expected = DDPMScheduler.from_pretrained(folder / component).betas
                assert np.array_equal(np.array(schedule.betas(), np.float32), expected.numpy())


# --- folders this project refuses


def config_copy(folder, tmp_path):
    """The folder without its weights (read_if_folder reads only the JSON files)."""
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors", "spiece.model"))
    return copy


def edit(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


SCHEDULER_CASES = [
    ("beta_schedule", "scaled_linear", "squaredcos_cap_v2, linear"),
    ("variance_type", "learned", "learned_range, fixed_small"),
    ("prediction_type", "v_prediction", "epsilon"),
    ("timestep_spacing", "karras", "leading, linspace, trailing"),
    ("trained_betas", [0.1, 0.2], "null"),
    ("rescale_betas_zero_snr", True, "false"),
    ("dynamic_thresholding_ratio", 1.5, "(0, 1]"),
    ("steps_offset", -1, "an integer in [0, 1000)"),
    ("thresholding", "yes", "true or false"),
]


@pytest.mark.parametrize(("field", "value", "supported"), SCHEDULER_CASES, ids=[c[0] for c in SCHEDULER_CASES])
def test_unsupported_scheduler_settings_are_named(tiny_if, tmp_path, field, value, supported):
    folder = config_copy(tiny_if[0], tmp_path)
    edit(folder / "scheduler" / "scheduler_config.json", **{field: value})
    with pytest.raises(ExportError) as error:
        read_if_folder(folder)
    message = str(error.value)
    print(message)
    assert f"{field} is {value!r}" in message and supported in message and str(folder) in message


FOLDER_CASES = {
    "pipeline class": ("model_index.json", {"_class_name": "IFImg2ImgPipeline"}, "_class_name is 'IFImg2ImgPipeline'"),
    "not a Unet": ("unet/config.json", {"_class_name": "UNet2DModel"}, "_class_name is 'UNet2DModel'"),
    "no class embedding": ("unet/config.json", {"class_embed_type": None}, "class_embed_type is None"),
    "odd in_channels": ("unet/config.json", {"in_channels": 7}, "in_channels is 7"),
    "image hint": ("unet/config.json", {"addition_embed_type": "image"}, "addition_embed_type is 'image'"),
    "no variance channels": ("unet/config.json", {"out_channels": 3}, "learned_range needs 6"),
    "noising scheduler": (
        "image_noising_scheduler/scheduler_config.json",
        {"beta_schedule": "sigmoid"},
        "beta_schedule is 'sigmoid'",
    ),
    "scheduler class": ("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_unsupported_folders_are_named(tiny_if, tmp_path, case):
    file, changes, expected = FOLDER_CASES[case]
    folder = config_copy(tiny_if[1], tmp_path)
    edit(folder / file, **changes)
    with pytest.raises(ExportError, match="supports|needs") as error:
        read_if_folder(folder)
    print(error.value)
    assert expected in str(error.value) and str(folder) in str(error.value)


def test_missing_parts_are_named(tiny_if, tmp_path):
    folder = config_copy(tiny_if[0], tmp_path)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ExportError, match=r"no unet/ folder"):
        read_if_folder(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ExportError, match=r"no model_index\.json.*IFPipeline"):
        read_if_folder(folder)
    with pytest.raises(ExportError, match="is not a folder"):
        read_if_folder(tmp_path / "missing")


def test_mismatched_text_encoder_and_cascade_are_named(tiny_if, tmp_path):
    folder = config_copy(tiny_if[0], tmp_path)
    edit(folder / "text_encoder" / "config.json", d_model=64)
    with pytest.raises(ExportError, match=r"d_model 64, the Unet reads text of width 32"):
        read_if_folder(folder)
    stage_1, stage_2 = (read_if_folder(f) for f in tiny_if)
    with pytest.raises(ExportError, match="stage I must be an IFPipeline folder"):
        check_if_cascade(stage_2, stage_1)


# --- the exported stages against diffusers and transformers


def test_float_and_int64_times_embed_identically(tiny_if):
    """The runtime feeds float32 times; diffusers' pipelines feed int64. The sinusoidal projection
    casts to float32 first, so every timestep gives the same embedding and the same Unet output."""
    stage = read_if_folder(tiny_if[1])
    module = load_if_unet(stage)
    steps = torch.arange(stage.schedule.num_train_timesteps)
    assert torch.equal(module.unet.time_proj(steps), module.unet.time_proj(steps.float()))
    generator = torch.Generator().manual_seed(0)
    size = stage.image_size
    x, low = (torch.randn(3, 3, size, size, generator=generator) for _ in range(2))
    text = torch.randn(3, MAX_LENGTH, EMBED_DIM, generator=generator)
    times, noise = torch.tensor([0, 417, 999]), torch.tensor([250, 0, 999])
    with torch.no_grad():
        ours = torch.cat(module(x, times.float(), text, low, noise.float()), dim=1)
        theirs = module.unet(torch.cat([x, low], 1), times, encoder_hidden_states=text, class_labels=noise).sample
    assert torch.equal(ours, theirs)


def test_fixed_small_unet_gives_noise_only(tiny_if, tmp_path):
    """With variance_type fixed_small the stage has no variance output: noise_pred is the Unet's
    first 3 channels, as the pipelines split it."""
    folder = tmp_path / "fixed"
    shutil.copytree(tiny_if[0], folder)
    edit(folder / "scheduler" / "scheduler_config.json", variance_type="fixed_small")
    stage = read_if_folder(folder)
    assert not stage.learned_variance and stage.signature(MAX_BATCH).output_names == ["noise_pred"]
    module = load_if_unet(stage)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    text, times = torch.randn(2, MAX_LENGTH, EMBED_DIM, generator=generator), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        noise_pred = module(x, times, text)
        full = module.unet(x, times, encoder_hidden_states=text).sample
    assert isinstance(noise_pred, torch.Tensor) and torch.equal(noise_pred, full[:, :3])


@pytest.mark.parametrize("index", [0, 1])
def test_onnx_unets_match_diffusers(tiny_if, exported, index):
    """Each ONNX Unet on ONNX Runtime against diffusers' UNet2DConditionModel called as the IF
    pipelines call it (int64 timesteps, the low-res image concatenated, class_labels)."""
    from diffusers import UNet2DConditionModel

    stage = read_if_folder(tiny_if[index])
    unet = UNet2DConditionModel.from_pretrained(stage.folder / "unet", low_cpu_mem_usage=False).eval()
    onnx_unet = session(exported[f"unet_{index}"])
    assert [i.name for i in onnx_unet.get_inputs()] == stage.signature(MAX_BATCH).input_names
    rng = np.random.default_rng(index)
    size = stage.image_size
    for batch in BATCHES:
        feeds = {
            "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
            "time": rng.choice(1000, size=batch, replace=False).astype(np.float32),
            "text_embeds": rng.standard_normal((batch, MAX_LENGTH, EMBED_DIM), dtype=np.float32),
        }
        model_input, class_labels = torch.from_numpy(feeds["x"]), None
        if stage.lowres_cond:
            feeds["lowres_cond_img"] = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
            feeds["lowres_noise_times"] = rng.choice(1000, size=batch, replace=False).astype(np.float32)
            model_input = torch.cat([model_input, torch.from_numpy(feeds["lowres_cond_img"])], 1)
            class_labels = torch.from_numpy(feeds["lowres_noise_times"]).long()
        with torch.no_grad():
            out = unet(
                model_input,
                torch.from_numpy(feeds["time"]).long(),
                encoder_hidden_states=torch.from_numpy(feeds["text_embeds"]),
                class_labels=class_labels,
            ).sample.numpy()
        noise_pred, variance_pred = onnx_unet.run(["noise_pred", "variance_pred"], feeds)
        assert_close(f"unet_{index} batch {batch} noise_pred", noise_pred, out[:, :3])
        assert_close(f"unet_{index} batch {batch} variance_pred", variance_pred, out[:, 3:])


def test_onnx_t5_matches_transformers_with_ifs_mask(tiny_if, exported):
    """The T5 encoder with IF's text semantics: transformers' tokenizer at length 77 (padding to it),
    the attention mask into T5, and the embeddings kept at padding positions (not zeroed)."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_if[0] / "tokenizer")
    model = T5EncoderModel.from_pretrained(tiny_if[0] / "text_encoder").eval()
    ours = load_if_text_encoder(tiny_if[0])
    onnx_encoder = session(exported["text_encoder"])
    for batch in BATCHES:
        prompts = [p.lower().strip() for p in PROMPTS[:batch]]
        tokens = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
        ids, mask = tokens["input_ids"].astype(np.int64), tokens["attention_mask"].astype(np.int64)
        our_ids, our_mask, _ = ours.tokenizer(prompts)
        assert np.array_equal(our_ids, ids) and np.array_equal(our_mask, mask)
        with torch.no_grad():
            expected = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
        (got,) = onnx_encoder.run(["text_embeds"], {"input_ids": ids, "attention_mask": mask})
        assert_close(f"text_encoder batch {batch}", got, expected)
        padding = mask == 0
        assert padding.any() and np.linalg.norm(got[padding], axis=-1).min() > 0  # IF's Unet pools over these too
    assert mask[-1].all()  # the long prompt fills all 77 positions (truncated, eos last)
    assert ids[-1, -1] == tokenizer.eos_token_id


def test_folders_with_only_fp16_weights_load_upcast(tiny_if, tmp_path):
    """DeepFloyd's repositories offer `*.fp16.safetensors` alone (half the download): the export loads
    them into FP32 exactly (every weight equals its FP16 value)."""
    from diffusers import UNet2DConditionModel

    from imagen.export.deepfloyd_onnx import weights_variant

    folder = tmp_path / "IF-I"
    shutil.copytree(tiny_if[0], folder)
    half = UNet2DConditionModel.from_pretrained(folder / "unet").to(torch.float16)
    shutil.rmtree(folder / "unet")
    half.save_pretrained(folder / "unet", variant="fp16")
    assert weights_variant(folder / "unet") == "fp16" and weights_variant(tiny_if[0] / "unet") is None
    loaded = load_if_unet(read_if_folder(folder)).unet.state_dict()
    expected = half.state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name].float()), name
