"""Markdown pieces both suites' reports use: a number as a reader wants it, and a table."""


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            if abs(value) < 1:
                return f"{value:.{digits}g}"
            return f"{value:,.{max(0, digits - 1)}f}".rstrip("0").rstrip(".")
        return f"{value:.2e}"
    return str(value)


def table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]
