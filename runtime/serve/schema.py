"""The request body of POST /v1/images/generations and the error bodies (OpenAI's images API shape).

Every field of OpenAI's images request is accepted (the `openai` client's `images.generate`). What
maps here is honoured: `prompt`, `n`, and `size`, `response_format`, `output_format`, `background`,
`stream` and `partial_images` where their value is what this server makes (the bundle's size,
base64 PNGs, opaque, in one piece; another value is a 400 from `api.check_request`). What has no
meaning here (`IGNORED`: the model, quality, style, moderation, ...) is accepted and named in the
answer's `x-imagen-ignored` header. The project's own fields (seed, steps, sampler, ...,
negative_prompt) follow.

Types are strict (JSON 2.0 is not an integer, "5" is not a number) and unknown fields are refused,
so a misspelt extension field fails loudly instead of being ignored. Ranges are not checked here:
the runtime's `Pipeline.settings` checks them (one place), and its ParameterError becomes a 400.
"""

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

GENERATIONS = "/v1/images/generations"
IGNORED_HEADER = "x-imagen-ignored"  # the request's fields that have no meaning here, comma-separated
# OpenAI's request fields that have no meaning for this server: accepted, reported, not used
IGNORED = (
    "model",
    "quality",
    "style",
    "user",
    "safety_identifier",
    "moderation",
    "output_compression",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
)
NO_MEANING = "OpenAI's; accepted and ignored (named in the x-imagen-ignored header)"


class GenerationRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(description="the text to draw")
    n: int = Field(1, description="images for this prompt, 1 to the bundle's max batch")
    size: str | None = Field(None, description='"WxH", the bundle\'s last image size (default), or "auto"')
    response_format: str | None = Field(None, description="b64_json only: the server keeps no files to link to")
    output_format: str | None = Field(None, description="png only")
    background: str | None = Field(None, description="auto or opaque: the images have no alpha channel")
    stream: bool | None = Field(None, description="false only: the answer comes in one piece")
    partial_images: int | None = Field(None, description="0 only: partial images need streaming")
    model: str | None = Field(None, description=NO_MEANING + "; the server runs its one bundle")
    quality: str | None = Field(None, description=NO_MEANING + "; set steps instead")
    style: str | None = Field(None, description=NO_MEANING + "; describe the style in the prompt")
    user: str | None = Field(None, description=NO_MEANING)
    safety_identifier: str | None = Field(None, description=NO_MEANING)
    moderation: str | None = Field(None, description=NO_MEANING + "; the server moderates nothing")
    output_compression: int | None = Field(None, description=NO_MEANING + "; PNG is lossless")
    complexity: str | None = Field(None, description=NO_MEANING)
    frame_count: int | None = Field(None, description=NO_MEANING + " (GIF output only)")
    frame_duration_ms: int | None = Field(None, description=NO_MEANING + " (GIF output only)")
    svg: dict | None = Field(None, description=NO_MEANING + " (SVG output only)")
    # extensions
    seed: int | None = Field(None, description="0 <= seed < 2**63; drawn and reported when absent")
    steps: int | list[int] | None = Field(None, description="sampler steps, one for all Unets or one per Unet")
    sampler: str | None = Field(None, description="ddpm, ddim or dpmpp_2m (default: the bundle's)")
    guidance_scale: float | None = Field(None, description="classifier-free guidance scale (>= 0)")
    eta: float | None = Field(None, description="DDIM eta in [0, 1] (default 0)")
    sr_strength: float | None = Field(None, description="share of steps of the super-resolution Unets, (0, 1]")
    negative_prompt: str | None = Field(
        None,
        description="what the images should not show: guidance's unconditional rows come from this text, for "
        'bundles that take a negative prompt (DeepFloyd IF; null or "": the empty prompt); a bundle with a '
        "learned null text (the demo, imagen-train's and MinImagen's) answers 400 with param negative_prompt",
    )

    def settings(self) -> dict:
        """The sampling settings for `engine.prepare` (the negative prompt is the request's, not a setting)."""
        return {
            name: getattr(self, name) for name in ("seed", "steps", "sampler", "guidance_scale", "eta", "sr_strength")
        }

    def ignored(self) -> list[str]:
        """The fields given (not null) that have no meaning here, in `IGNORED`'s order."""
        return [name for name in IGNORED if getattr(self, name) is not None]


class ServeError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(errors: list) -> ServeError:
    """A 422 for the first schema violation pydantic found, naming the field and what it takes."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid body", "type": ""}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        param = None
        message = 'the body is not valid JSON; send a JSON object with at least "prompt"'
    elif kind == "extra_forbidden":
        known = ", ".join(GenerationRequest.model_fields)
        message = f"unknown field {param!r}; the known fields are {known}"
    elif kind == "missing":
        message = f"{param!r} is required"
    else:
        message = f"{param or 'the body'}: {first.get('msg', 'invalid')}"
        field = GenerationRequest.model_fields.get(location[0]) if location else None
        if field is not None and field.description:
            message += f" ({location[0]}: {field.description})"
    return ServeError(422, message, param=param, code=kind or None)
