"""Client reward that scores batches on a reward server (`lmmr1 serve-reward`), with timeouts and retries.

Wire format (JSON, NaN sent as null): POST `<url>/score` with `{"responses": [...], "rows": [...]}` answers
`{"total": [...], "components": {name: [...]}, "stats": {...}}`; POST `<url>/check_rows` with `{"rows": [...]}` answers
200, or 400 with the problem in `detail`. A server that is down, slow or answers garbage is retried `retries` times
with exponential backoff, then raises `RuntimeError` naming the URL and the last problem: never a silent 0.

Run a server: lmmr1 serve-reward --reward math --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths


def to_wire(values: Sequence[float]) -> list[float | None]:
    """NaN -> None, since JSON has no NaN."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


def from_wire(values: Any, n: int, what: str) -> list[float]:
    """None -> NaN; raises ValueError unless `values` is a list of n numbers or nulls."""
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"{what}: expected a list of {n} numbers")
    out = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"{what}: {v!r} is not a number")
        out.append(math.nan if v is None else float(v))
    return out


def jsonable_rows(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Rows as JSON values (anything exotic, e.g. a path object, becomes its string)."""
    return json.loads(json.dumps(list(rows), default=str))


def parse_output(body: Any, n: int) -> RewardOutput:
    """Validate a /score answer for n responses into a RewardOutput (ValueError on anything malformed)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("components", {}), Mapping):
        raise ValueError("answer is not an object with 'total' and 'components'")
    total = from_wire(body.get("total"), n, "total")
    components = {str(k): from_wire(v, n, f"components[{k!r}]") for k, v in body.get("components", {}).items()}
    stats = body.get("stats", {})
    if not isinstance(stats, Mapping):
        raise ValueError("stats: expected an object")
    return RewardOutput(total=total, components=components, stats={str(k): float(v) for k, v in stats.items()})


class RemoteReward(Reward):
    """Posts batches to a reward server at `url`."""

    name = "remote"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: {url!r} must start with http:// or https://")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _post(self, path: str, payload: dict[str, Any], parse: Any) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.post(self.url + path, json=payload)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in (400, 422):  # a rejected request: retrying cannot help
                raise ValueError(f"reward server {self.url}: {self._detail(response)}")
            if response.status_code != 200:
                problem = f"HTTP {response.status_code}: {self._detail(response)}"
                continue
            try:
                return parse(response.json())
            except (ValueError, TypeError) as e:
                problem = f"malformed answer ({e}): {response.text[:200]!r}"
        raise RuntimeError(f"reward server {self.url}{path} failed after {self.retries + 1} attempts; last problem: "
                           f"{problem}")

    @staticmethod
    def _detail(response: Any) -> str:
        try:
            return str(response.json().get("detail", response.text[:200]))
        except (ValueError, AttributeError):
            return response.text[:200]

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        payload = {"responses": list(responses), "rows": jsonable_rows(rows)}
        return self._post("/score", payload, lambda body: parse_output(body, len(responses)))

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._post("/check_rows", {"rows": jsonable_rows(rows)}, lambda body: body)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
