"""OpenRLHF's remote reward protocol over loopback, both ways: `lmmr1 serve-reward --protocol openrlhf` answers the
requests an OpenRLHF/LMM-R1 run posts to `--remote_rm_url` (query = prompt + response in the chat template, prompts =
the rows' message strings, labels = their answers), and `RemoteReward(protocol="openrlhf")` scores through an
OpenRLHF-style server (a stand-in with LMM-R1's verifier interface), so either side can be ours."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from lmmr1.data.records import load_rows
from lmmr1.rewards import RemoteReward, build_reward
from lmmr1.rewards.server import main as serve_main
from tests.conftest import free_port

SYSTEM = "Think in <think> </think>, answer in <answer> </answer> with \\boxed{}."
PAD = "<|endoftext|>"  # OpenRLHF decodes padded sequences with their special tokens


def openrlhf_query(message: list[dict], response: str) -> str:
    """What OpenRLHF's experience maker sends as `query`: the whole sequence decoded with special tokens (chatml)."""
    turns = []
    for turn in message:
        content = turn["content"]
        if isinstance(content, list):
            content = "".join("<|vision_start|><|image_pad|><|vision_end|>" if item["type"] == "image" else item["text"]
                              for item in content)
        turns.append(f"<|im_start|>{turn['role']}\n{content}<|im_end|>\n")
    return "".join(turns) + "<|im_start|>assistant\n" + response + "<|im_end|>" + PAD * 3


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """LMM-R1-format rows: a math row and a Sokoban row whose level is a .npy grid (######/#@ $.#/######)."""
    folder = tmp_path_factory.mktemp("openrlhf")
    np.save(folder / "level_0.npy", np.array([[0, 0, 0, 0, 0, 0], [0, 5, 1, 4, 2, 0], [0, 0, 0, 0, 0, 0]]))
    Image.new("RGB", (32, 32)).save(folder / "frame_0.png")
    math_message = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 6 times 10?"}]
    sokoban_message = [{"role": "user", "content": [{"type": "image", "image": "frame_0.png"},
                                                    {"type": "text", "text": "Solve it: Left, Right, Up, Down."}]}]
    rows = [{"message": json.dumps(math_message), "answer": "$\\boxed{60}$"},
            {"message": json.dumps(sokoban_message), "answer": "", "env_path": "level_0.npy"}]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, [math_message, sokoban_message]


@pytest.fixture(scope="module")
def served(data_file):
    """`lmmr1 serve-reward --protocol openrlhf --reward lmm_r1 --dataset data.jsonl`, run by its CLI entry point."""
    path, _, _ = data_file
    port, holder = free_port(), {}

    def run(app, host, port, log_level):  # uvicorn.run, but stoppable from the test
        holder["server"] = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        holder["server"].run()

    patch = pytest.MonkeyPatch()
    patch.setattr(uvicorn, "run", run)
    argv = ["--protocol", "openrlhf", "--reward", "lmm_r1", "--dataset", str(path), "--port", str(port)]
    thread = threading.Thread(target=lambda: holder.setdefault("code", serve_main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (holder.get("server") and holder["server"].started):
        assert time.monotonic() < deadline and "code" not in holder, "reward server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/get_reward"
    holder["server"].should_exit = True
    thread.join(20)
    patch.undo()
    assert holder.get("code") == 0  # main closed the reward (its math workers) on the way out


@pytest.mark.timeout(60)
def test_serve_reward_answers_openrlhf_requests(served, data_file):
    _, rows, messages = data_file
    responses = ["<think>6*10</think><answer>$\\boxed{60}$</answer>",  # format 0.5 + accuracy 1.0
                 "<think>push the box right</think><answer>Right, Right</answer>",  # solved: clipped to 10
                 "<think>go</think><answer>left</answer>"]  # into the wall: 0 + 0.5 + 0.05 + 0.001
    body = {"query": [openrlhf_query(messages[i], r) for i, r in zip((0, 1, 1), responses)],
            "prompts": [rows[i]["message"] for i in (0, 1, 1)],  # the data file's strings, as OpenRLHF sends them
            "labels": [rows[i]["answer"] for i in (0, 1, 1)]}
    answer = httpx.post(served, json=body, timeout=30)  # what OpenRLHF's remote_rm_fn posts
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["rewards"] == pytest.approx([1.5, 10.0, 0.551])
    assert got["accuracy"][0] == 1.0 and got["accuracy"][1] is None  # components beside the rewards; null: n/a
    assert got["solved"][1:] == [1.0, 0.0]

    unknown = {**body, "prompts": ["not a prompt of the dataset"] * 3}
    refused = httpx.post(served, json=unknown, timeout=30)
    assert refused.status_code == 400 and "not in the server's --dataset" in refused.json()["detail"]
    assert httpx.post(served, json={"query": ["x"], "prompts": [], "labels": []}, timeout=30).status_code == 400


@pytest.mark.timeout(60)
def test_our_client_and_server_agree_with_local_scoring(served, data_file):
    path, _, _ = data_file
    rows = load_rows(path)
    responses = ["<think>6*10</think><answer>$\\boxed{61}$</answer>", "<think>go</think><answer>right, right</answer>"]
    local = build_reward({"reward": "lmm_r1_sokoban"})([responses[1]], [rows[1]])
    client = build_reward(served)  # a URL ending in /get_reward speaks OpenRLHF's protocol
    assert isinstance(client, RemoteReward) and client.protocol == "openrlhf"
    out = client(responses, rows)
    assert out.total == pytest.approx([0.5, local.total[0]])
    assert out.components["format"] == [1.0, 1.0] and out.components["env_return"][1] == pytest.approx(10.8)
    client.check_rows(rows)  # no such endpoint in this protocol: nothing is sent
    client.close()


class _StandIn(http.server.BaseHTTPRequestHandler):
    """An OpenRLHF-style reward server in the shape of LMM-R1's verifiers: the response after the chatml assistant
    prefix, end-of-turn markers removed; 1.0 when it contains the label; extra per-item lists beside `rewards`."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        if "unknown" in body["prompts"]:
            status, answer = 400, {"error": "problem not found"}
        else:
            cut = [q.split("<|im_start|>assistant\n", 1)[1].replace("<|im_end|>", "").replace(PAD, "").strip()
                   for q in body["query"]]
            rewards = [float(bool(label) and label in r) for r, label in zip(cut, body["labels"])]
            status, answer = 200, {"rewards": rewards, "format_rewards": [0.5] * len(cut), "responses": cut}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.mark.timeout(60)
def test_remote_reward_speaks_openrlhf_to_a_standin(data_file):
    path, raw, _ = data_file
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/get_reward"
        client = RemoteReward(url, protocol="openrlhf", timeout=10, retries=0)
        rows = load_rows(path)
        out = client(["<think>t</think><answer>$\\boxed{60}$</answer>", "<think>t</think><answer>Up</answer>"], rows)
        sent = _StandIn.requests[-1]
        assert sent["path"] == "/get_reward"
        assert sent["prompts"][0] == raw[0]["message"]  # the message as JSON: the file's string for a text row
        assert json.loads(sent["prompts"][1]) == rows[1]["message"]  # (image paths resolved by the loader)
        assert sent["labels"] == ["$\\boxed{60}$", ""]
        assert sent["query"][0].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
        assert sent["query"][0].endswith("<|im_start|>assistant\n<think>t</think><answer>$\\boxed{60}$</answer>"
                                         "<|im_end|>")
        assert out.total == [1.0, 0.0]
        assert out.components == {"format_rewards": [0.5, 0.5]}  # number lists kept, the list of texts dropped
        client(["r"], [{**rows[1], "_prompt": raw[1]["message"]}])  # a row that kept its string (`lmmr1 score`)
        assert _StandIn.requests[-1]["prompts"] == [raw[1]["message"]]  # is sent byte for byte
        with pytest.raises(ValueError, match="problem not found"):  # a 400 is not retried
            client(["x"], [{"message": "unknown"}])
        client.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_openrlhf_client_options_are_checked():
    with pytest.raises(ValueError, match="protocol"):
        RemoteReward("http://127.0.0.1:1/get_reward", protocol="grpc")
    with pytest.raises(ValueError, match="prompt template 'llama'"):
        RemoteReward("http://127.0.0.1:1/get_reward", protocol="openrlhf", prompt_template="llama")
    assert build_reward({"url": "http://127.0.0.1:1/x", "protocol": "openrlhf", "prompt_template": "base"}) \
        .prompt_template == "base"
