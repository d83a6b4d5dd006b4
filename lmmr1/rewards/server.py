"""`lmmr1 serve-reward`: serve any reward over HTTP (FastAPI + uvicorn) for `RemoteReward` clients.

    lmmr1 serve-reward --reward math --host 127.0.0.1 --port 8000
    lmmr1 serve-reward --reward configs/rewards/mixed.yaml --port 8000

Endpoints: GET /health, POST /score, POST /check_rows (wire format in `lmmr1/rewards/remote.py`). A reward's
ValueError (e.g. a row it cannot score) answers 400 with the message; anything else answers 500.
"""

import argparse
import sys
from typing import Any

from lmmr1.rewards.base import Reward
from lmmr1.rewards.remote import to_wire


def create_app(reward: Reward) -> Any:
    """A FastAPI app scoring with `reward`. Endpoints are sync, so FastAPI runs them in its thread pool (the math
    worker pool is thread-safe). No `from __future__ import annotations` in this file: FastAPI must see the local
    request models as classes, not strings."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    class ScoreRequest(BaseModel):
        responses: list[str]
        rows: list[dict[str, Any]]

    class CheckRequest(BaseModel):
        rows: list[dict[str, Any]]

    app = FastAPI(title="lmmr1 reward server")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "reward": reward.name}

    @app.post("/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        try:
            out = reward(request.responses, request.rows)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return {"total": to_wire(out.total), "components": {k: to_wire(v) for k, v in out.components.items()},
                "stats": out.stats}

    @app.post("/check_rows")
    def check_rows(request: CheckRequest) -> dict[str, str]:
        try:
            reward.check_rows(request.rows)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        return {"status": "ok"}

    return app


def main(argv: list[str]) -> int:
    """Entry point of `lmmr1 serve-reward`."""
    import uvicorn

    from lmmr1.rewards.build import build_reward

    parser = argparse.ArgumentParser(prog="lmmr1 serve-reward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", required=True, help="built-in name, plug-in file.py:fn, or YAML config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        reward = build_reward(args.reward)
    except ValueError as e:
        print(f"lmmr1 serve-reward: error: {e}", file=sys.stderr)
        return 2
    try:
        uvicorn.run(create_app(reward), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        reward.close()
    return 0
