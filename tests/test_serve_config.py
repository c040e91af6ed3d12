"""`ServeConfig`, declared once: imagen-serve's click options are derived from its fields (names,
defaults, help, ranges), and the Ray app's `key=value` parsing reads the same fields (no Ray here:
tests/test_serve_ray.py has the Ray-only arguments)."""

import dataclasses

import pytest
from click.testing import CliRunner

from imagen.runtime.backends import BACKENDS
from imagen.runtime.serve.config import CLI, RAY, ArgumentError, ServeConfig, option_fields, parse_options


def _serve_command():
    from imagen.runtime.serve.cli import main

    return main


def test_imagen_serve_options_are_the_config_fields_with_their_defaults():
    params = {param.name: param for param in _serve_command().params}
    fields = option_fields(ServeConfig, CLI)
    assert list(params) == [field.name for field in fields] + ["debug"]
    for field in fields:
        param, spec = params[field.name], field.metadata["option"]
        assert param.opts == ["--" + field.name.replace("_", "-")]
        assert (param.default, param.help) == (field.default, spec.help), field.name
    assert tuple(params["backend"].type.choices) == tuple(BACKENDS)
    assert (params["port"].type.min, params["port"].type.max) == (0, 65535)
    assert params["timeout_s"].type.min_open and params["timeout_s"].type.min == 0
    assert {field.name for field in dataclasses.fields(ServeConfig)} - set(params) == {
        "max_body_bytes",
        "api_key",
        "warmup",
    }  # set in code only


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--timeout-s", "0"], "--timeout-s"),
        (["--port", "70000"], "--port"),
        (["--max-wait-ms", "-1"], "--max-wait-ms"),
        (["--threads", "0"], "--threads"),
        (["--providers", "gpu"], "--providers"),
    ],
)
def test_imagen_serve_refuses_out_of_range_options_in_one_line(args, fragment):
    result = CliRunner().invoke(_serve_command(), args)
    assert result.exit_code == 2
    line = (getattr(result, "stderr", None) or result.output).strip()
    assert line.startswith("imagen-serve: error: ") and fragment in line and "\n" not in line, line


def test_the_ray_front_end_parses_the_same_fields():
    (values,) = parse_options((ServeConfig,), {"max_wait_ms": "20", "threads": "none", "max_prompt_chars": 9}, RAY)
    assert values == {"max_wait_ms": 20.0, "threads": None, "max_prompt_chars": 9}
    assert ServeConfig(**values) == ServeConfig(max_wait_ms=20.0, max_prompt_chars=9)
    cases = [  # args, name, a part of the one-line message
        ({"port": "1"}, "port", "is not an argument of this app"),  # imagen-serve's own
        ({"max_wait_ms": "20000"}, "max_wait_ms", "must be a number in [0, 10000], got 20000.0"),
        ({"timeout_s": 0}, "timeout_s", "must be a number > 0, got 0"),
        ({"threads": True}, "threads", "must be a whole number >= 1, got True"),
        ({"max_prompt_chars": "1e3"}, "max_prompt_chars", "e.g. max_prompt_chars=4000"),
        ({"backend": "cuda"}, "backend", "must be one of auto, onnxruntime, tensorrt"),
        ({"bundle": 5}, "bundle", "must be text"),
    ]
    for args, name, fragment in cases:
        with pytest.raises(ArgumentError) as caught:
            parse_options((ServeConfig,), args, RAY)
        assert caught.value.name == name and fragment in str(caught.value), str(caught.value)
        assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_queue_images_default_is_four_full_batches():
    assert ServeConfig().queue_images(8) == 32 and ServeConfig(max_queue_images=5).queue_images(8) == 5
