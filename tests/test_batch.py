"""imagen-batch on the embedded demo bundle at 4 steps: WebDataset shards read back with tarfile and
webdataset, the Parquet index read with pyarrow, seeds from sha256 of the ids, error rows (bad JSON,
no prompt, bad settings, empty prompt, bad id, unknown field) and the exit status, duplicate ids
refused before any work, resuming after an interrupt and after SIGKILL (the same bytes as an
uninterrupted run, no complete shard's id generated again), and a run on a local Ray (2 CPUs, two
replicas, read_text; read_parquet in a slow test) writing the same bytes as a run in-process."""

import hashlib
import importlib.util
import io
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imagen.runtime import Pipeline, Request
from imagen.runtime.batch import BatchError, Defaults, run_job, seed_from_id
from imagen.runtime.batch.cli import main as batch_cli

STEPS = Defaults(steps=4)
PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle at the bottom",
    "a small yellow circle on the right",
    "a large red square",
]
needs_pyarrow = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed: pip install 'imagen-cascade[batch]'"
)


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(None, threads=1) as pipe:
        yield pipe


class Spy:
    """The pipeline, noting the prompts of every image it generates."""

    def __init__(self, pipe, interrupt_at: int | None = None):
        self.pipe, self.bundle, self.prompts, self.calls, self.interrupt_at = pipe, pipe.bundle, [], 0, interrupt_at

    def generate(self, requests, settings):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.prompts += [request.prompts for request in requests for _ in range(request.n)]
        return self.pipe.generate(requests, settings)


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and the index (the job file names the prompts file's format, the rows files repeat the index)."""
    names = [path.name for path in sorted(out.glob("*.tar"))] + [p.name for p in out.glob("index.*")]
    return {name: (out / name).read_bytes() for name in names}


def read_index(out: Path) -> list[dict]:
    import pyarrow.parquet as parquet

    return parquet.read_table(out / "index.parquet").to_pylist()


def png_array(data: bytes) -> tuple[np.ndarray, dict]:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    return np.asarray(image), dict(image.text)


def test_seed_from_id_is_the_ids_sha256():
    for row_id in ("1", "a-row", "Ünïcode_7", "x" * 128):
        digest = hashlib.sha256(row_id.encode("utf-8")).digest()
        assert seed_from_id(row_id) == int.from_bytes(digest[:8], "big") // 2
        assert 0 <= seed_from_id(row_id) < 2**63
    assert seed_from_id("1") == 0x6B86B273FF34FCE1 // 2  # sha256(b"1") starts 6b86b273ff34fce1


@needs_pyarrow
def test_text_prompts_make_webdataset_shards_and_an_index(pipe, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS)
    summary = run_job(prompts, tmp_path / "out", defaults=STEPS, shard_size=2, pipe=pipe)
    out = tmp_path / "out"
    assert (summary.rows, summary.images, summary.errors, summary.shards) == (5, 5, [], 3)
    assert sorted(path.name for path in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(out.rglob("*.tmp"))
    shard = members(out / "00000.tar")
    assert [name for name, _ in shard] == ["1_0.png", "1_0.json", "1_0.txt", "2_0.png", "2_0.json", "2_0.txt"]
    settings = pipe.settings(steps=4)
    both = pipe.generate(
        [Request(PROMPTS[0], 1, seed_from_id("1")), Request(PROMPTS[1], 1, seed_from_id("2"))], settings
    )
    for line, (png, info, text) in enumerate(zip(shard[0::3], shard[1::3], shard[2::3]), start=1):
        array, chunks = png_array(png[1])
        np.testing.assert_array_equal(array, both[line - 1].array[0])  # the same engine batch: exactly
        solo = pipe(PROMPTS[line - 1], steps=4, seed=seed_from_id(str(line))).array[0]
        difference = int(np.abs(array.astype(int) - solo).max())
        print(f"line {line}: max |batch of 2 - alone| = {difference} levels")
        assert difference <= 2  # the engines' batch-dependent rounding, within 2 of 255 levels
        meta = json.loads(info[1])
        assert (meta["id"], meta["key"], meta["line"], meta["seed"]) == (
            str(line),
            f"{line}_0",
            line,
            seed_from_id(str(line)),
        )
        assert (meta["steps"], meta["prompt"], "timings" in meta) == ([4, 4], PROMPTS[line - 1], False)
        assert chunks["seed"] == str(seed_from_id(str(line))) and chunks["prompt"] == PROMPTS[line - 1]
        assert text[1].decode() == PROMPTS[line - 1]
    index = read_index(out)
    assert [(row["key"], row["shard"], row["status"]) for row in index] == [
        ("1_0", "00000.tar", "ok"),
        ("2_0", "00000.tar", "ok"),
        ("3_0", "00001.tar", "ok"),
        ("4_0", "00001.tar", "ok"),
        ("5_0", "00002.tar", "ok"),
    ]
    assert index[0]["info"] == shard[1][1].decode()
    wds = pytest.importorskip("webdataset")
    urls = [str(path) for path in sorted(out.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [sample["__key__"] for sample in samples] == ["1_0", "2_0", "3_0", "4_0", "5_0"]
    assert [sample["txt"].decode() for sample in samples] == PROMPTS
    assert samples[1]["png"] == shard[3][1] and json.loads(samples[4]["json"])["key"] == "5_0"


@needs_pyarrow
def test_error_rows_are_recorded_and_the_job_goes_on(pipe, tmp_path):
    rows = [
        {"id": "a", "prompt": PROMPTS[0], "seed": 7, "n": 2, "sampler": "ddim", "guidance_scale": 2.0},
        "{not json",
        {"id": "b"},
        {"id": "c", "prompt": PROMPTS[1], "steps": 0},
        {"id": "d", "prompt": "   "},
        {"id": "e.1", "prompt": PROMPTS[2]},
        {"id": "f", "prompt": PROMPTS[3], "stpes": 4},
        {"id": 7, "prompt": PROMPTS[4], "seed": None},
        {"id": "h", "prompt": PROMPTS[4], "negative_prompt": "blurry"},  # the demo takes no negative prompt
    ]
    prompts = write_lines(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out"
    args = [str(prompts), "--out", str(out), "--steps", "4", "--shard-size", "3", "--threads", "1"]
    result = CliRunner().invoke(batch_cli, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert (
        lines[-2]
        == f"imagen-batch: 3 images of 9 rows in 3 shards in {out}; 7 rows failed (status error in index.parquet)"
    )
    assert lines[-1].startswith(f"imagen-batch: error: 7 of 9 rows failed and made no image (status error in {out}")
    errors = {row["line"]: (row["error"], row["message"]) for row in read_index(out) if row["status"] == "error"}
    assert {line: kind for line, (kind, _) in errors.items()} == {
        2: "RowError",
        3: "RowError",
        4: "ParameterError",
        5: "PromptError",
        6: "RowError",
        7: "RowError",
        9: "ParameterError",
    }
    assert errors[2][1].startswith("line 2: not valid JSON")
    assert errors[3][1] == "line 3: no 'prompt'; each row needs one"
    assert errors[4][1].startswith("line 4: steps must be None or an integer in [1, 250]")
    assert errors[5][1] == "line 5: the prompt is empty or whitespace only; give some text"
    assert "contains '.'" in errors[6][1] and "unknown field 'stpes'" in errors[7][1]
    assert errors[9][1].startswith("line 9: negative_prompt must be null for this bundle")
    assert all(f"imagen-batch: {kind}: {message}" in lines for kind, message in errors.values())
    assert members(out / "00001.tar") == []  # every row of the shard failed: an empty shard, still complete
    first = members(out / "00000.tar")
    assert [name for name, _ in first] == ["a_0.png", "a_0.json", "a_0.txt", "a_1.png", "a_1.json", "a_1.txt"]
    alone = pipe(PROMPTS[0], steps=4, seed=7, num_images_per_prompt=2, sampler="ddim", guidance_scale=2.0)
    for image in range(2):
        np.testing.assert_array_equal(png_array(first[3 * image][1])[0], alone.array[image])
        assert json.loads(first[3 * image + 1][1])["sampler"] == "ddim"
    last = members(out / "00002.tar")
    solo = pipe(PROMPTS[4], steps=4, seed=seed_from_id("7"))  # an integer id is its decimal string
    assert last[0][0] == "7_0.png"
    np.testing.assert_array_equal(png_array(last[0][1])[0], solo.array[0])
    again = CliRunner().invoke(batch_cli, [*args, "--quiet"])  # complete: nothing to do, the errors still count
    assert again.exit_code == 2 and "7 of 9 rows failed" in again.stderr
    other = CliRunner().invoke(batch_cli, [*args, "--steps", "5", "--quiet"])  # other steps: another job
    assert other.exit_code == 2 and "holds another job: its defaults" in other.stderr


def test_duplicate_ids_are_refused_before_any_work(tmp_path):
    rows = [
        {"id": "a", "prompt": "x"},
        {"id": "b", "prompt": "y"},
        {"id": "a", "prompt": "z"},
        {"id": "b", "prompt": ""},
    ]
    prompts = write_lines(tmp_path / "prompts.jsonl", rows)
    result = CliRunner().invoke(batch_cli, [str(prompts), "--out", str(tmp_path / "out"), "--index", "jsonl"])
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"imagen-batch: error: {prompts} has duplicate ids: 'a' on lines 1, 3; 'b' on lines 2, 4;"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="file locks are POSIX's (fcntl)")
def test_a_folder_that_another_run_writes_is_refused(pipe, tmp_path):
    import fcntl

    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BatchError, match="another imagen-batch is writing"):
            run_job(prompts, tmp_path / "out", defaults=STEPS, pipe=pipe, index="jsonl")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [".lock", "rows"]
    run_job(prompts, tmp_path / "out", defaults=STEPS, pipe=pipe, index="jsonl")  # released: it runs
    assert (tmp_path / "out" / "00000.tar").is_file()


def test_a_parquet_index_without_pyarrow_is_refused_with_the_install(pipe, tmp_path, monkeypatch):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS[:1])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(BatchError, match=r"pip install 'imagen-cascade\[batch\]'.*--index jsonl"):
        run_job(prompts, tmp_path / "out", defaults=STEPS, pipe=pipe)
    assert not (tmp_path / "out").exists()
    run_job(prompts, tmp_path / "out", defaults=STEPS, pipe=pipe, index="jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert (row["key"], row["shard"], row["seed"]) == ("1_0", "00000.tar", seed_from_id("1"))


def resume_case(tmp_path, pipe):
    """Six rows in three shards of two rows, and the uninterrupted run's bytes. Shard 1 is two engine
    batches (its rows' samplers differ); shard 2 one of three images."""
    rows = [{"id": f"r{i}", "prompt": prompt} for i, prompt in enumerate(PROMPTS)]
    rows[3]["sampler"] = "ddim"
    rows.append({"id": "r5", "prompt": "a blue circle", "n": 2})
    prompts = write_lines(tmp_path / "prompts.jsonl", rows)
    run_job(prompts, tmp_path / "whole", defaults=STEPS, shard_size=2, pipe=pipe)
    return prompts, folder_bytes(tmp_path / "whole")


@needs_pyarrow
def test_resume_after_an_interrupt_makes_the_same_bytes(pipe, tmp_path):
    prompts, whole = resume_case(tmp_path, pipe)
    out, options = tmp_path / "out", {"defaults": STEPS, "shard_size": 2}

    def stop_after_first(name):
        raise KeyboardInterrupt

    first = Spy(pipe)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted: 1 of 3 shards are complete in .*; run the same command"):
        run_job(prompts, out, pipe=first, on_shard=stop_after_first, **options)
    assert sorted(path.name for path in out.glob("*.tar")) == ["00000.tar"] and not list(out.rglob("*.tmp"))
    assert [row["key"] for row in read_index(out)] == ["r0_0", "r1_0"]
    middle = Spy(pipe, interrupt_at=2)  # inside shard 1: its first row made, its second interrupted
    with pytest.raises(KeyboardInterrupt, match="interrupted: 1 of 3 shards"):
        run_job(prompts, out, pipe=middle, **options)
    assert sorted(path.name for path in out.glob("*.tar")) == ["00000.tar"] and not list(out.rglob("*.tmp"))
    last = Spy(pipe)
    summary = run_job(prompts, out, pipe=last, **options)
    assert (summary.shards_written, summary.images_written, summary.images) == (2, 5, 7)
    assert first.prompts == PROMPTS[:2] and middle.prompts == PROMPTS[2:3]
    assert last.prompts == [*PROMPTS[2:], "a blue circle", "a blue circle"]  # shard 1 again: it was never written
    assert folder_bytes(out) == whole


KILL_DRIVER = r"""
import os, re, signal, sys
real = os.replace
def replace(src, dst, *args, **kwargs):
    if re.search(r"00001\.tar$", os.fspath(dst)):
        os.kill(os.getpid(), signal.SIGKILL)  # the shard is written whole under its temporary name
    real(src, dst, *args, **kwargs)
os.replace = replace
from imagen.runtime.batch.cli import main
sys.argv = ["imagen-batch"] + sys.argv[1:]
main()
"""


@needs_pyarrow
def test_resume_after_sigkill_while_a_shard_is_renamed(pipe, tmp_path):
    prompts, whole = resume_case(tmp_path, pipe)
    out = tmp_path / "out"
    args = [str(prompts), "--out", str(out), "--steps", "4", "--shard-size", "2", "--quiet"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, *args, "--threads", "1"], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(path.name for path in out.glob("*.tar")) == ["00000.tar"]
    assert len(list(out.glob(".00001.tar.*.tmp"))) == 1  # the whole shard, under a name no reader takes
    assert (out / "rows" / "00001.jsonl").is_file()  # its rows file goes first; without the tar it does not count
    rerun = Spy(pipe)
    summary = run_job(prompts, out, defaults=STEPS, shard_size=2, pipe=rerun)
    assert rerun.prompts == [*PROMPTS[2:], "a blue circle", "a blue circle"]
    assert summary.shards_written == 2 and not list(out.rglob("*.tmp"))
    assert folder_bytes(out) == whole


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


RAY_ROWS = [
    {"id": "a", "prompt": PROMPTS[0], "n": 2},
    {"id": "b", "prompt": PROMPTS[1], "seed": 3, "sampler": "ddim"},
    "{not json",
    {"id": "c", "prompt": PROMPTS[2]},
    {"id": "d", "prompt": ""},
    {"id": "e", "prompt": PROMPTS[3], "guidance_scale": 1.5},
    {"id": "g", "prompt": PROMPTS[4], "guidance_scale": 1e38},  # NonFiniteError in its replica
]
QUIET_RAY = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore::DeprecationWarning:ray",
)


@needs_pyarrow
@QUIET_RAY
def test_a_ray_run_writes_the_same_bytes_as_a_local_run(local_ray, pipe, tmp_path):
    """read_text on two replicas; a bad JSON line, an empty prompt and a failing batch among the rows."""
    jsonl = write_lines(tmp_path / "prompts.jsonl", RAY_ROWS)
    options = {"defaults": STEPS, "shard_size": 3, "threads": 1}
    local = run_job(jsonl, tmp_path / "local", pipe=pipe, **options)
    remote = run_job(jsonl, tmp_path / "ray", use_ray=True, replicas=2, **options)
    assert (remote.images, len(remote.errors), remote.shards) == (local.images, len(local.errors), 3) == (5, 3, 3)
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
    errors = [row["error"] for row in read_index(tmp_path / "ray") if row["status"] == "error"]
    assert errors == ["RowError", "PromptError", "NonFiniteError"]


@pytest.mark.slow
@needs_pyarrow
@QUIET_RAY
def test_a_ray_run_reads_parquet_as_a_local_run_does(local_ray, pipe, tmp_path):
    import pyarrow
    import pyarrow.parquet as parquet

    good = [row for row in RAY_ROWS if isinstance(row, dict) and row["prompt"]]
    fields = sorted({name for row in good for name in row})
    table = pyarrow.Table.from_pylist([{name: row.get(name) for name in fields} for row in good])
    parquet.write_table(table, tmp_path / "prompts.parquet")  # nulls where a row gives no value: not given
    options = {"defaults": STEPS, "shard_size": 3, "threads": 1}
    run_job(tmp_path / "prompts.parquet", tmp_path / "local", pipe=pipe, **options)
    run_job(tmp_path / "prompts.parquet", tmp_path / "ray", use_ray=True, replicas=1, **options)
    assert folder_bytes(tmp_path / "ray") == folder_bytes(tmp_path / "local")
    index = read_index(tmp_path / "ray")
    assert [(row["key"], row["seed"]) for row in index][1:3] == [("a_1", seed_from_id("a")), ("b_0", 3)]
    assert [row["error"] for row in index if row["status"] == "error"] == ["NonFiniteError"]
