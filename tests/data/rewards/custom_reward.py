"""lmmr1 style plug-ins: fn(responses, rows) -> list[float] or list[dict[str, float]]."""


def brevity(responses, rows):
    return [1.0 / (1 + len(r)) for r in responses]


def parts(responses, rows):
    return [{"has_answer": float("<answer>" in r), "short": float(len(r) < 30)} for r in responses]


def with_total(responses, rows):
    return [{"total": 10.0, "x": 1.0} for _ in responses]


def wrong_length(responses, rows):
    return [1.0]


def not_numbers(responses, rows):
    return ["high" for _ in responses]
