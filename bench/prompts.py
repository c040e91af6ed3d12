"""The prompts both suites send, one list so that their numbers are measured on the same requests."""

PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle at the bottom",
    "a small yellow circle on the right",
    "a large red square",
    "a blue triangle on the left",
    "a green circle at the top",
    "a large yellow triangle",
]


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
