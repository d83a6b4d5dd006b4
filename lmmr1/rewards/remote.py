"""Client reward that scores batches on a reward server (`lmmr1 serve-reward`), with timeouts and retries.

Wire format (JSON, NaN sent as null): POST `<url>/score` with `{"responses": [...], "rows": [...]}` answers
`{"total": [...], "components": {name: [...]}, "stats": {...}}`; POST `<url>/check_rows` with `{"rows": [...]}` answers
200, or 400 with the problem in `detail`. A server that is down, slow or answers garbage is retried `retries` times
with exponential backoff (`backoff`, doubling, at most `MAX_BACKOFF` seconds per wait), then raises
`RewardServerError` naming the URL and the last problem: never a silent 0. An answer that retrying cannot change
raises ValueError at once: 400 (a row the reward rejects), and `RequestRefused` for 401 (a missing or wrong token)
and 413 (a request over the server's size limit), which are about the setup, not a row. The token, when the server
wants one, is sent as `Authorization: Bearer <token>`: from `token`, else from the `LMMR1_REWARD_TOKEN` environment
variable (prefer the variable: a config's `token` is saved with the run).

With `protocol="openrlhf"` the client speaks OpenRLHF's remote reward protocol instead (see `openrlhf.py`): `url` is
the full endpoint (LMM-R1's verifiers: `http://127.0.0.1:5000/get_reward`), each batch is one POST of
`{"query", "prompts", "labels"}` answered by `{"rewards"}`, and `check_rows` checks nothing (there is no such
endpoint). Timeouts, retries and the token work as above.

Run a server: lmmr1 serve-reward --reward math --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lmmr1.rewards.base import Reward, RewardOutput, check_lengths

TOKEN_ENV = "LMMR1_REWARD_TOKEN"  # the shared token, read by both `lmmr1 serve-reward` and `RemoteReward`
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts, however many retries are configured
CHECK_CHUNK = 1024  # rows per /check_rows request
PROTOCOLS = ("lmmr1", "openrlhf")  # ours (/score, /check_rows) and OpenRLHF's remote reward model (one endpoint)


class RewardServerError(RuntimeError):
    """The reward server could not be reached or kept failing after every retry."""


class RequestRefused(ValueError):
    """The reward server refused a request as a whole (401 token, 413 size): a problem of the setup, not of a row."""


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
    """Posts batches to a reward server at `url`; see the module docstring for retries and the token."""

    name = "remote"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 token: str | None = None, protocol: str = "lmmr1", prompt_template: str = "chatml") -> None:
        from lmmr1.rewards.openrlhf import template

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: {url!r} must start with http:// or https://")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {protocol!r} is not one of {list(PROTOCOLS)}")
        template(prompt_template)  # ValueError naming the choices
        self.protocol, self.prompt_template = protocol, prompt_template
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff}")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.token = token
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _headers(self) -> dict[str, str]:
        token = self.token or os.environ.get(TOKEN_ENV)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _post(self, path: str, payload: dict[str, Any], parse: Any) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.Client(timeout=self.timeout, headers=self._headers())
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            try:
                response = self._client.post(self.url + path, json=payload)
            except httpx.HTTPError as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status_code in (400, 422):  # a rejected request: retrying cannot help
                raise ValueError(f"reward server {self.url}: {self._detail(response)}")
            if response.status_code == 401:
                sent = "rejected the token it was sent" if "Authorization" in self._client.headers else \
                    "wants a token and none was sent"
                raise RequestRefused(f"reward server {self.url} {sent} (HTTP 401); set {TOKEN_ENV} to the token the "
                                     f"server was started with (or `token:` in the reward config)")
            if response.status_code == 413:
                raise RequestRefused(f"reward server {self.url}: {self._detail(response)}; send fewer rows per "
                                     f"request (`lmmr1 score --batch-size`) or raise the server's --max-request-mb")
            if response.status_code != 200:
                problem = f"HTTP {response.status_code}: {self._detail(response)}"
                continue
            try:
                return parse(response.json())
            except (ValueError, TypeError) as e:
                problem = f"malformed answer ({e}): {response.text[:200]!r}"
        raise RewardServerError(f"reward server {self.url}{path} failed after {self.retries + 1} attempts; last "
                                f"problem: {problem}. Is `lmmr1 serve-reward` running and reachable at {self.url}? "
                                f"(its log says why it stopped)")

    @staticmethod
    def _detail(response: Any) -> str:
        try:
            return str(response.json().get("detail", response.text[:200]))
        except (ValueError, AttributeError):
            return response.text[:200]

    def __call__(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        check_lengths(responses, rows)
        if self.protocol == "openrlhf":
            from lmmr1.rewards import openrlhf

            payload = openrlhf.request(responses, rows, self.prompt_template)
            return self._post("", payload, lambda body: openrlhf.parse_answer(body, len(responses)))
        payload = {"responses": list(responses), "rows": jsonable_rows(rows)}
        return self._post("/score", payload, lambda body: parse_output(body, len(responses)))

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.protocol == "openrlhf":  # OpenRLHF servers have no endpoint for it
            return
        for start in range(0, len(rows), CHECK_CHUNK):  # every training row: chunks stay under the server's limits
            self._post("/check_rows", {"rows": jsonable_rows(rows[start:start + CHECK_CHUNK])}, lambda body: body)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
