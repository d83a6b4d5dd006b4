"""`lmmr1 serve-reward`: serve any reward over HTTP (FastAPI + uvicorn) for `RemoteReward` clients.

    lmmr1 serve-reward --reward math --host 127.0.0.1 --port 8000
    LMMR1_REWARD_TOKEN=s3cret lmmr1 serve-reward --reward configs/rewards/mixed.yaml --port 8000

Endpoints: GET /health, POST /score, POST /check_rows (wire format in `lmmr1/rewards/remote.py`). A reward's
ValueError (e.g. a row it cannot score) answers 400 with the message; anything else answers 500.

With --protocol openrlhf it also answers OpenRLHF's remote reward requests (what `--remote_rm_url` points at, and
LMM-R1's verifier servers answer), so an OpenRLHF/LMM-R1 run can score with any lmmr1 reward:

    lmmr1 serve-reward --protocol openrlhf --reward lmm_r1_math --port 5000     # --remote_rm_url .../get_reward
    lmmr1 serve-reward --protocol openrlhf --reward lmm_r1 --dataset sokoban.jsonl --port 5000

POST /get_reward `{"query": [...], "prompts": [...], "labels": [...]}` answers `{"rewards": [...]}` plus each
component as a list. The response is cut out of each query after the --prompt-template's assistant prefix; the row is
`{"message": prompt, "answer": label}`, or with --dataset the data row whose input column equals the prompt (how a
Sokoban row finds its level), its answer replaced by a non-empty label (see `lmmr1/rewards/openrlhf.py`).

Security: the reward (a plug-in above all) is code that runs with this process's rights, on inputs the clients send.
The server listens on 127.0.0.1 unless --host says otherwise. With a token (--token, or the LMMR1_REWARD_TOKEN
environment variable, which `ps` does not show) every request, /health included, must carry
`Authorization: Bearer <token>` or is answered 401 before anything else runs. A request body over --max-request-mb
is answered 413 and a /score batch of more than --max-batch responses 400, before the reward sees them.
"""

import argparse
import hmac
import json
import os
import sys
from typing import Any

from lmmr1.rewards.base import Reward
from lmmr1.rewards.remote import TOKEN_ENV, to_wire

DEFAULT_MAX_REQUEST_MB = 128.0  # a rollout batch of thousands of responses with their rows fits many times over
DEFAULT_MAX_BATCH = 8192  # responses per /score request (each may cost a math-verify call)


async def _reply(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware in front of every route (docs and unknown paths included): the token first, then the body
    size. The body is read here, whole, and replayed to the app, so a chunked body without Content-Length is capped too.
    """

    def __init__(self, app: Any, token: str | None, max_request_mb: float) -> None:
        self.app, self.max_request_mb, self.max_request_bytes = app, max_request_mb, int(max_request_mb * 2**20)
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan events
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await _reply(send, 401, "missing or wrong token: send the header 'Authorization: Bearer <token>' with the "
                                    f"token the server was started with (RemoteReward reads {TOKEN_ENV})",
                         [(b"www-authenticate", b"Bearer")])
            return
        limit = self.max_request_bytes
        too_large = f"request body over this server's limit of {self.max_request_mb:g} MiB (--max-request-mb)"
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            await _reply(send, 400, "bad Content-Length header")
            return
        if int(declared) > limit:  # refused unread: HTTP clients read an early answer while still sending
            await _reply(send, 413, too_large)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:  # a chunked body, or more than its Content-Length said
                await _reply(send, 413, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def create_app(reward: Reward, token: str | None = None, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
               max_batch: int = DEFAULT_MAX_BATCH, openrlhf: dict[str, Any] | None = None) -> Any:
    """An ASGI app scoring with `reward`, behind `RequestGuard`. Endpoints are sync, so FastAPI runs them in its thread
    pool (the math worker pool is thread-safe). No `from __future__ import annotations` in this file: FastAPI must see
    the local request models as classes, not strings. `openrlhf` ({"template": name, "index": DatasetIndex | None})
    adds POST /get_reward, OpenRLHF's protocol."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    if max_request_mb <= 0:
        raise ValueError(f"--max-request-mb must be > 0, got {max_request_mb}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")

    class ScoreRequest(BaseModel):
        responses: list[str]
        rows: list[dict[str, Any]]

    class CheckRequest(BaseModel):
        rows: list[dict[str, Any]]

    def check_batch(n: int) -> None:
        if n > max_batch:  # "rows": what a client's batch size counts
            raise HTTPException(status_code=400, detail=f"batch of {n} rows is over this server's limit of "
                                                        f"{max_batch} (--max-batch); send smaller batches")

    app = FastAPI(title="lmmr1 reward server")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "reward": reward.name, "max_request_mb": max_request_mb, "max_batch": max_batch}

    @app.post("/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        check_batch(max(len(request.responses), len(request.rows)))
        try:
            out = reward(request.responses, request.rows)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return {"total": to_wire(out.total), "components": {k: to_wire(v) for k, v in out.components.items()},
                "stats": out.stats}

    if openrlhf is not None:
        _add_openrlhf_route(app, reward, check_batch, **openrlhf)

    @app.post("/check_rows")
    def check_rows(request: CheckRequest) -> dict[str, str]:  # cheap per row: bounded by --max-request-mb alone
        try:
            reward.check_rows(request.rows)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return {"status": "ok"}

    return RequestGuard(app, token, max_request_mb)


def _add_openrlhf_route(app: Any, reward: Reward, check_batch: Any, template: str = "chatml",
                        index: Any = None) -> None:
    from fastapi import HTTPException
    from pydantic import BaseModel

    from lmmr1.rewards import openrlhf

    openrlhf.template(template)

    class OpenRLHFRequest(BaseModel):
        query: list[str]
        prompts: list[Any] | None = None
        labels: list[Any] | None = None

    @app.post("/get_reward")
    def get_reward(request: OpenRLHFRequest) -> dict[str, Any]:
        check_batch(len(request.query))
        try:
            rows = openrlhf.rows_for(request.prompts, request.labels, len(request.query), index)
            responses = [openrlhf.response_from_query(q, template) for q in request.query]
            out = reward(responses, rows)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return openrlhf.answer(out)


def resolve_token(flag: str | None) -> str | None:
    """--token, else the environment variable, else None (no token); ValueError for one a header cannot carry."""
    token = flag if flag is not None else os.environ.get(TOKEN_ENV)
    if not token:
        return None
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"the token (--token or {TOKEN_ENV}) must be printable ASCII without spaces")
    return token


def main(argv: list[str]) -> int:
    """Entry point of `lmmr1 serve-reward`."""
    import uvicorn

    from lmmr1.rewards.build import build_reward

    parser = argparse.ArgumentParser(prog="lmmr1 serve-reward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name, plug-in file.py:fn, or YAML config")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=None,
                        help=f"shared token every request must send (default: ${TOKEN_ENV}; unset = no token)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help="request bodies over this many MiB are answered 413 (default: %(default)g)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="/score requests with more responses are answered 400 (default: %(default)d)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--protocol", choices=["lmmr1", "openrlhf"], default="lmmr1",
                        help="openrlhf: also answer POST /get_reward as OpenRLHF's remote reward model does")
    parser.add_argument("--prompt-template", default="chatml",
                        help="openrlhf: chat template of the queries (chatml, qwen1, base, phi3, phi4, gemma3)")
    parser.add_argument("--dataset", default=None,
                        help="openrlhf: data file(s), comma-separated, whose rows requests are joined to by prompt "
                             "(needed for Sokoban rows: their level is in env_path)")
    parser.add_argument("--input-key", default="message", help="openrlhf: the data files' input column")
    parser.add_argument("--label-key", default="answer", help="openrlhf: the data files' label column")
    args = parser.parse_args(argv)
    try:
        token = resolve_token(args.token)
        openrlhf = None
        if args.protocol == "openrlhf":
            from lmmr1.rewards.openrlhf import DatasetIndex, template

            template(args.prompt_template)
            index = None if not args.dataset else DatasetIndex(
                [p.strip() for p in args.dataset.split(",") if p.strip()], args.input_key, args.label_key)
            openrlhf = {"template": args.prompt_template, "index": index}
        elif args.dataset:
            raise ValueError("--dataset is for --protocol openrlhf")
        reward = build_reward(args.reward)
    except ValueError as e:
        print(f"lmmr1 serve-reward: error: {e}", file=sys.stderr)
        return 2
    if openrlhf is not None and openrlhf["index"] is not None:
        try:  # a dataset row the reward cannot score fails now, not at the first request for it
            reward.check_rows(openrlhf["index"].rows)
        except ValueError as e:
            reward.close()
            print(f"lmmr1 serve-reward: error: --dataset: {e}", file=sys.stderr)
            return 2
    try:
        app = create_app(reward, token, args.max_request_mb, args.max_batch, openrlhf)
    except ValueError as e:
        reward.close()
        print(f"lmmr1 serve-reward: error: {e}", file=sys.stderr)
        return 2
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lmmr1 serve-reward: warning: listening on {args.host} without a token: anyone who can reach port "
              f"{args.port} can run this reward's code on inputs of their choosing; set {TOKEN_ENV} (or --token)",
              file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        reward.close()
    return 0


if __name__ == "__main__":  # python -m lmmr1.rewards.server: the same, without loading the training stack
    sys.exit(main(sys.argv[1:]))
