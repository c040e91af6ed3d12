"""One Unet on two engines, chosen per call by its timestep: `SplitBackend`.

Under `--precision auto` the base Unet runs its noisiest timesteps (where the scene is laid out:
which shape, which colour, where) in FP32 and the rest in bf16 (choice.py says why and what it
measured). Both engines run the same ONNX file and take the same feeds; the sampling loop does not
know there are two.
"""

from ..arrays import to_numpy
from ..errors import SignatureError
from ..samplers import spaced_timesteps


class SplitBackend:
    """`noisy` for calls whose `time` is at least `switch`, `rest` for the others; both stay open.

    A call whose rows straddle the switch (a caller batching several timesteps) goes to `noisy`, the
    more exact engine. `close` closes both, the first error raised after both were tried."""

    def __init__(self, noisy, rest, switch: float):
        self.noisy, self.rest, self.switch = noisy, rest, float(switch)
        self.stage = noisy.stage
        self.array_namespace = getattr(noisy, "array_namespace", None)

    def engine_for(self, feeds: dict):
        """The engine that runs these feeds (their largest `time` against the switch)."""
        time = feeds.get("time") if isinstance(feeds, dict) else None
        if time is None:
            raise SignatureError(f"{self.stage.name}: inputs must include time (the engine is chosen by it)")
        return self.noisy if float(to_numpy(time).max(initial=-float("inf"))) >= self.switch else self.rest

    def fewest_steps(self, total: int, sampling) -> int:
        """The fewest steps of a Unet with `total` timesteps, spaced as `sampling` (its how_sampled)
        says, that fall on both sides of the switch: a warm-up that runs both engines (1 where none do)."""
        spacing, offset = sampling.spacing, sampling.steps_offset
        walks = (spaced_timesteps(total, n, 1.0, spacing, offset) for n in range(2, total + 1))
        return next((len(w) for w in walks if max(w) >= self.switch > min(w)), 1)

    def run(self, feeds: dict) -> dict:
        return self.engine_for(feeds).run(feeds)

    def close(self) -> None:
        errors = []
        for engine in (self.noisy, self.rest):
            try:
                engine.close()
            except Exception as error:  # noqa: BLE001 - raised below, once both were tried
                errors.append(error)
        if errors:
            raise errors[0]
