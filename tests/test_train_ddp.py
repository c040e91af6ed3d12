"""imagen-train under torchrun (DDP, gloo on the CPU, 2 processes): the same global batch gives the
same weights and EMA as one process, with and without accumulation; every rank holds identical
weights; SIGTERM to torchrun saves a step that a resume at 2 processes continues exactly; a
checkpoint of 2 processes resumes in 1; after kill -9 and a resume log.jsonl holds each step once.
In-process checks: the global-batch loss is Imagen.loss bit for bit (so one process trains as
before), DDP at world size 1 is bit-identical to one process, unused parameters fail by name,
SIGTERM in one process, fp16 and bf16.

The torchrun runs go through a small driver (written below into the test's folder) that runs
`imagen-train`'s own `main` in each worker. On rank 0 it can act at a given step, from the training's
log callback: send SIGTERM to torchrun (which passes it on to both workers) and wait until its own
has reached the training's handler, so that the stop falls after the next step; or SIGKILL itself. It can
also record each rank's tensors at every checkpoint, where they are compared across ranks.

Tolerance, two processes against one at the same global batch (FP32, gloo, 3 steps, lr 1e-4, with
and without accumulation): losses to 1e-6 relative (measured 1.1e-7), the EMA to 1e-6 absolute
(measured 2.9e-7), weights with a real gradient to 1e-5 (measured 1.8e-6). The conv biases of
`block1` (`*.block1.project.bias`) feed a GroupNorm that removes them (one or two channels per group
at these widths), so their true gradient is 0 or nearly, and Adam scales summation-order noise up
to steps of nearly lr: they are held to Adam's bound, 2 * lr * steps (measured 9.7e-5 against 6e-4).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagen.reference.checkpoint import truncate_log
from imagen.reference.distributed import (
    CascadeLoss,
    UnusedParametersError,
    check_batch,
    draw_loss_inputs,
    mismatched,
)
from imagen.reference.imagen import Imagen
from imagen.reference.train import TrainConfig, TrainingInterrupted, train

# Shared by the in-process runs and the torchrun runs (the command line has no Unet overrides).
SETTINGS = dict(
    image_sizes=(16, 32),
    timesteps=30,
    batch_size=4,
    checkpoint_every=3,
    val_every=100,  # validation at the last step only
    sample_every=0,
    max_length=24,
    seed=0,
    progress=False,
)
LR = TrainConfig.lr
ZERO_GRADIENT = ".block1.project.bias"


def cli_args(out: Path, steps: int, *extra: str) -> list[str]:
    """SETTINGS on the command line."""
    flags = {
        "--out": out,
        "--image-sizes": "16,32",
        "--timesteps": 30,
        "--batch-size": 4,
        "--steps": steps,
        "--checkpoint-every": 3,
        "--val-every": 100,
        "--sample-every": 0,
        "--max-length": 24,
        "--seed": 0,
        "--threads": 1,
    }
    return [str(x) for pair in flags.items() for x in pair] + ["--quiet", *extra]


DRIVER = r"""
import functools, os, signal, sys, threading
from safetensors.torch import save_file
import imagen.reference.cli as cli
import imagen.reference.train as training

action, at_step, dump = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class StopSignals(training.StopSignals):  # the training's own handler, which also tells this driver
    arrived = threading.Event()
    def _handle(self, signum, frame):
        super()._handle(signum, frame)
        StopSignals.arrived.set()

training.StopSignals = StopSignals

def on_step(record):
    if record["step"] != at_step:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigterm":  # to torchrun, which sends SIGTERM to every worker; wait until ours is handled
        os.kill(os.getppid(), signal.SIGTERM)
        if not StopSignals.arrived.wait(120):
            sys.exit("torchrun did not pass SIGTERM on")

if dump != "-":
    check = training.check_replicas
    def check_replicas(ctx, tensors):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f"{dump}/rank{ctx.rank}.safetensors")
        check(ctx, tensors)
    training.check_replicas = check_replicas

cli.train = functools.partial(training.train, log=on_step)
sys.argv = ["imagen-train", *sys.argv[4:]]
cli.main()
"""


def torchrun(folder: Path, args: list[str], action: str = "none", at_step: int = 0, dump: str = "-"):
    driver = folder / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(driver), action, str(at_step), dump, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=folder)


def checkpoint(run: Path, step: int, kind: str) -> dict:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{kind}.safetensors")


def log_steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_training(one: Path, two: Path, step: int, steps_taken: int):
    """Weights and EMA of two runs at `step` within the tolerances of the module docstring."""
    a, b = checkpoint(one, step, "model"), checkpoint(two, step, "model")
    assert a.keys() == b.keys()
    real = max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith(ZERO_GRADIENT))
    zero = max((a[k] - b[k]).abs().max().item() for k in a if k.endswith(ZERO_GRADIENT))
    ea, eb = checkpoint(one, step, "ema"), checkpoint(two, step, "ema")
    ema = max((ea[k] - eb[k]).abs().max().item() for k in ea)
    print(f"weights {real:.3g}, zero-gradient biases {zero:.3g}, EMA {ema:.3g}")
    assert real < 1e-5 and zero <= 2 * LR * steps_taken * 1.01 and ema < 1e-6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def single(folder):
    """One process, global batch 4, 3 steps, then continued to a 4th."""
    out = folder / "single"
    records = []
    train(TrainConfig(out=str(out), steps=3, **SETTINGS), log=records.append)
    train(TrainConfig(out=str(out), steps=4, resume=True, **SETTINGS), log=records.append)
    return out, records


@pytest.fixture(scope="module")
def world2(folder):
    """Two processes, global batch 4 (2 each), 3 steps; every rank's tensors at each checkpoint."""
    out, dump = folder / "world2", folder / "replicas"
    dump.mkdir()
    done = torchrun(folder, cli_args(out, 3), dump=str(dump))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, dump


def test_two_processes_match_one_process_at_the_same_global_batch(single, world2):
    (one, records), (two, _) = single, world2
    losses_one = [r["loss"] for r in records[:3]]
    losses_two = [r["loss"] for r in log_steps(two)]
    print("losses, 1 process:", losses_one, "2 processes:", losses_two)
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    assert_same_training(one, two, 3, 3)


def test_every_rank_holds_the_same_weights_ema_and_optimizer_state(world2):
    _, dump = world2
    rank0, rank1 = load_file(dump / "rank0.safetensors"), load_file(dump / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema/") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    names = sorted(rank0)
    fingerprints = [
        torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in map(d.get, names)])
        for d in (rank0, rank1)
    ]
    assert mismatched(names, fingerprints) == []
    fingerprints[1][names.index("ema/unets.0.init_conv.convs.0.weight"), 0] += 1e-12
    assert mismatched(names, fingerprints) == ["ema/unets.0.init_conv.convs.0.weight"]


@pytest.fixture(scope="module")
def accum_killed(folder):
    """Two processes with 2 micro-batches each, killed (SIGKILL, rank 0) after logging step 4; the
    last checkpoint is step 3."""
    out = folder / "accum"
    done = torchrun(folder, cli_args(out, 4, "--grad-accum", "2"), action="kill", at_step=4)
    assert done.returncode != 0
    return out


def test_accumulation_over_two_processes_matches_one_process(single, accum_killed):
    assert (accum_killed / "checkpoints" / "latest").read_text() == "step_0000003"
    one_losses = [r["loss"] for r in single[1]]
    np.testing.assert_allclose([r["loss"] for r in log_steps(accum_killed)], one_losses, rtol=1e-6)
    assert_same_training(single[0], accum_killed, 3, 3)


def test_kill_9_then_resume_in_one_process_logs_each_step_once(single, accum_killed):
    assert [r["step"] for r in log_steps(accum_killed)] == [1, 2, 3, 4]  # step 4 is lost with the process
    records = []
    train(TrainConfig(out=str(accum_killed), steps=4, resume=True, **SETTINGS), log=records.append)
    assert [r["step"] for r in records] == [4]
    log = log_steps(accum_killed)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose(log[-1]["loss"], single[1][-1]["loss"], rtol=1e-6)
    assert_same_training(single[0], accum_killed, 4, 4)  # written by 2 processes, continued by 1


def test_sigterm_to_torchrun_saves_every_rank_at_one_step_and_resume_is_exact(folder, world2):
    out = folder / "sigterm"
    stopped = torchrun(folder, cli_args(out, 3), action="sigterm", at_step=1)
    assert stopped.returncode != 0
    assert "stopped by SIGTERM after step 2; the checkpoint is saved" in stopped.stderr, stopped.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    assert [r["step"] for r in log_steps(out)] == [1, 2]
    resumed = torchrun(folder, cli_args(out, 3, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    without_time = [[(k, v) for k, v in r.items() if k != "time"] for r in log_steps(out)]
    assert without_time == [[(k, v) for k, v in r.items() if k != "time"] for r in log_steps(world2[0])]
    for kind in ("model", "ema", "optimizer"):
        a, b = checkpoint(out, 3, kind), checkpoint(world2[0], 3, kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind


# In one process


def test_global_batch_loss_is_imagen_loss_bit_for_bit_and_slices_average_to_it():
    from imagen.reference.data import ShapesData, draw_batch
    from imagen.reference.imagen import ImagenConfig
    from imagen.reference.text_encoder import TextEncoder
    from imagen.reference.train import _unet_config

    torch.manual_seed(0)
    encoder = TextEncoder.tiny(max_length=24)
    unets = [_unet_config(name, {}, 24) for name in ("BaseTest", "SuperTest")]
    imagen = Imagen(unets, ImagenConfig(image_sizes=(16, 32), timesteps=30), encoder.embed_dim)
    images, captions = draw_batch(ShapesData(32), 4, 0, 0)
    embeds, mask = encoder.encode(captions)
    generator = torch.Generator().manual_seed(5)  # training draws for every trained Unet from one generator
    expected = [imagen.loss(images, embeds, mask, i, generator, 0.3) for i in (0, 1)]
    generator = torch.Generator().manual_seed(5)
    draws = [draw_loss_inputs(imagen, i, 4, generator, 0.3) for i in (0, 1)]
    model = CascadeLoss(imagen, [0, 1])
    assert [torch.equal(a, b) for a, b in zip(model(images, embeds, mask, draws), expected)] == [True, True]
    halves = [
        model(images[s], embeds[s], mask[s], [d.slice(s.start, s.stop) for d in draws])
        for s in (slice(0, 2), slice(2, 4))
    ]
    mean = [(a + b) / 2 for a, b in zip(*halves)]
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=0)
    assert [name for name, _ in model.named_parameters()][0].startswith("unets.0.")


def test_batch_that_does_not_split_is_refused_with_the_fix(tmp_path):
    check_batch(8, 2, 2)
    with pytest.raises(ValueError, match="does not divide into 2 process.*multiple of 4"):
        check_batch(6, 2, 2)
    with pytest.raises(ValueError, match="multiple of 3"):
        train(TrainConfig(out=str(tmp_path / "run"), steps=1, grad_accum=3, **SETTINGS))
    assert not (tmp_path / "run").exists()


def test_sigterm_in_one_process_saves_and_resume_is_exact(single, tmp_path):
    out = tmp_path / "run"

    def on_step(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once; read at the end of step 2

    previous = signal.getsignal(signal.SIGTERM)  # another library's (Ray's, in a full run) or the default
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after step 2"):
        train(TrainConfig(out=str(out), steps=3, **SETTINGS), log=on_step)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is given back
    train(TrainConfig(out=str(out), steps=3, resume=True, **SETTINGS))
    for kind in ("model", "ema"):
        a, b = checkpoint(out, 3, kind), checkpoint(single[0], 3, kind)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_is_truncated_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3, 4, 3)] + ['{"step": 5, "lo']
    log.write_text("\n".join(lines))
    truncate_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert log.read_text().splitlines()[-1] == lines[4]  # a step logged twice keeps its last record
    before = log.stat().st_mtime_ns
    truncate_log(log, 3)
    assert log.stat().st_mtime_ns == before


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one process, so that train() takes the DDP path in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_at_one_process_is_bit_identical_to_one_process(single, process_group, tmp_path):
    out = tmp_path / "ddp1"
    train(TrainConfig(out=str(out), steps=3, **SETTINGS))
    for kind in ("model", "ema", "optimizer"):
        a, b = checkpoint(out, 3, kind), checkpoint(single[0], 3, kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind


def test_unused_parameters_fail_with_their_names(process_group, tmp_path, monkeypatch):
    class WithOrphan(Imagen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unets[1].orphan = torch.nn.Linear(2, 2)  # in the Unet, never called

    monkeypatch.setattr("imagen.reference.train.Imagen", WithOrphan)
    with pytest.raises(
        UnusedParametersError, match=r"2 trained parameter\(s\).*unets\.1\.orphan\.weight, unets\.1\.orphan\.bias"
    ):
        train(TrainConfig(out=str(tmp_path / "run"), steps=2, **SETTINGS))


def test_fp16_resumes_exactly_with_its_scaler_and_bf16_trains(single, tmp_path):
    settings = dict(SETTINGS, checkpoint_every=1)
    whole, split = tmp_path / "whole", tmp_path / "split"
    records = []
    train(TrainConfig(out=str(whole), steps=2, precision="fp16", **settings), log=records.append)
    train(TrainConfig(out=str(split), steps=1, precision="fp16", **settings))
    train(TrainConfig(out=str(split), steps=2, resume=True, **settings))  # fp16 is the run's own setting
    state = json.loads((split / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] == 65536.0  # no overflow in two steps: the initial scale
    for kind in ("model", "ema"):
        a, b = checkpoint(whole, 2, kind), checkpoint(split, 2, kind)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    bf16 = []
    train(TrainConfig(out=str(tmp_path / "bf16"), steps=1, precision="bf16", **settings), log=bf16.append)
    fp32_first = single[1][0]["loss"]
    print("step 1 loss fp32", fp32_first, "fp16", records[0]["loss"], "bf16", bf16[0]["loss"])
    assert records[0]["loss"] != fp32_first and bf16[0]["loss"] != fp32_first
    np.testing.assert_allclose([records[0]["loss"], bf16[0]["loss"]], fp32_first, rtol=1e-3)  # measured 6e-6, 1.5e-5
