"""`omnigpt serve` under load, on loopback: throughput against the engine, then many streaming clients.

    python benchmarks/serve_load.py [--clients 64 --requests 256 --max-tokens 32]

A GPT-2 124M-shape model (random weights, fp32; a character tokenizer, sampling limited to its
ids) is saved to a temporary folder and served by `omnigpt serve` in its own process. Then:

1. Throughput (`--throughput-clients` 16, prompts of 32 random tokens, 128 new tokens each, greedy,
   `ignore_eos`): one client alone; all of them at once (aggregate tokens/s, first request sent to
   last token received); and the same model decoding the same batch in this process with
   `generate_tokens` at batch 16 (the engine's own figure) while the server idles. Medians of
   `--repeats` runs.
2. Load: `--clients` streaming clients share `--requests` completions (logprobs on, so every token
   received is counted; usage asked for); the server admits `--max-running` and queues
   `--max-waiting`, so at the peak some requests get a deliberate 503 and retry after its
   Retry-After. A poller times /health every 25 ms meanwhile.

Checks: no failures other than 503s, every stream ends with [DONE], usage equals the tokens received,
/health p99 under 100 ms. The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from omnigpt.checkpoint import load_checkpoint, save_checkpoint
from omnigpt.config import GenerationOptions, ModelConfig
from omnigpt.generate import generate_tokens
from omnigpt.hardware import machine_info
from omnigpt.model import GPT
from omnigpt.tokenizer import Tokenizer

VOCAB = 50257
TEXT = "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0123456789 (),;:'\"\n"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def stream_completion(client: httpx.AsyncClient, body: dict) -> dict:
    """One streaming request, read to the end: status, tokens received (from logprobs), usage,
    whether [DONE] came, time to first token and the gaps between chunks (seconds)."""
    start = time.perf_counter()
    out = {"status": 0, "tokens": 0, "usage": None, "done": False, "ttft": None, "gaps": []}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        out["status"] = response.status_code
        if response.status_code != 200:
            out["retry_after"] = float(response.headers.get("retry-after", "1"))
            await response.aread()
            return out
        last = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]["message"]
                continue
            if event.get("usage"):
                out["usage"] = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                received = len((choice.get("logprobs") or {}).get("tokens", []))
                if received:
                    now = time.perf_counter()
                    if out["ttft"] is None:
                        out["ttft"] = now - start
                    else:
                        out["gaps"].append((now - last) / received)
                    last = now
                    out["tokens"] += received
    return out


async def throughput(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate tokens/s of one request per prompt, all sent at once."""
    body = {"model": "gpt2-shape", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(stream_completion(client, {**body, "prompt": p}) for p in prompts)
        )
        seconds = time.perf_counter() - start
    assert all(r["status"] == 200 and r["tokens"] == new_tokens for r in results), results
    return len(prompts) * new_tokens / seconds


async def load(url: str, args, prompts: list[list[int]]) -> dict:
    """`args.clients` clients share `args.requests` streaming requests; /health polled meanwhile."""
    body = {"model": "gpt2-shape", "max_tokens": args.max_tokens, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}  # fmt: skip
    todo = list(range(args.requests))
    results, rejected, health = [], [0], []
    stop = asyncio.Event()

    async def client_loop(client):
        while todo:
            i = todo.pop()
            while True:
                r = await stream_completion(client, {**body, "prompt": prompts[i % len(prompts)]})
                if r["status"] != 503:
                    break
                rejected[0] += 1
                await asyncio.sleep(r["retry_after"])
            results.append(r)

    async def poll_health(client):
        while not stop.is_set():
            t = time.perf_counter()
            status = (await client.get("/health")).status_code
            health.append((time.perf_counter() - t, status))
            await asyncio.sleep(0.025)

    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        async with httpx.AsyncClient(base_url=url, timeout=10) as health_client:
            poller = asyncio.create_task(poll_health(health_client))
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
            seconds = time.perf_counter() - start
            stop.set()
            await poller
    failed = [r for r in results if r["status"] != 200 or "error" in r]
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    health_s = [h for h, _ in health]
    return {
        "requests": len(results),
        "failed": len(failed),
        "rejected_503_then_retried": rejected[0],
        "streams_ending_with_done": sum(r["done"] for r in results),
        "usage_equals_tokens_received": sum(r["usage"] == r["tokens"] for r in results),
        "tokens_received": tokens,
        "seconds": round(seconds, 1),
        "aggregate_tokens_per_s": round(tokens / seconds, 1),
        "ttft_p50_ms": round(1000 * percentile(ttfts, 0.5), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 0.99), 1),
        "inter_token_p50_ms": round(1000 * percentile(gaps, 0.5), 1),
        "inter_token_p99_ms": round(1000 * percentile(gaps, 0.99), 1),
        "health_checks": len(health),
        "health_ok": sum(s == 200 for _, s in health),
        "health_p50_ms": round(1000 * percentile(health_s, 0.5), 1),
        "health_p99_ms": round(1000 * percentile(health_s, 0.99), 1),
    }


def engine_batch(folder: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """The same model decoding all prompts as one batch with generate_tokens, in this process."""
    model, tok = load_checkpoint(folder)
    opts = GenerationOptions(max_new_tokens=new_tokens, temperature=0, stop_at_eot=False)
    generate_tokens(model, prompts, opts, vocab_limit=tok.vocab_size)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = generate_tokens(model, prompts, opts, vocab_limit=tok.vocab_size)
        times.append(time.perf_counter() - t)
        assert all(len(o) == new_tokens for o in out)
    return len(prompts) * new_tokens / statistics.median(times)


def start_server(folder: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "omnigpt", "serve", "--model", str(folder), "--port", str(port),
               "--name", "gpt2-shape", "--max-running", str(args.max_running),
               "--max-waiting", str(args.max_waiting), "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become ready in 120 s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32, help="per request in the load test")
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-waiting", type=int, default=32)
    p.add_argument("--throughput-clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128, help="per request in the throughput test")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--skip-load", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    tok = Tokenizer.train_char([TEXT])
    rng = random.Random(0)
    prompts = [[rng.randrange(tok.vocab_size) for _ in range(args.prompt_tokens)]
               for _ in range(max(args.throughput_clients, 64))]  # fmt: skip
    figures: dict = {"machine": machine_info(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-shape"
        save_checkpoint(folder, GPT(ModelConfig.from_preset("gpt2", vocab_size=VOCAB)).eval(), tok)
        server = start_server(folder, args.port, args)
        url = f"http://127.0.0.1:{args.port}"
        try:
            batch = prompts[: args.throughput_clients]
            one = statistics.median(
                asyncio.run(throughput(url, batch[:1], args.new_tokens))
                for _ in range(args.repeats)
            )
            many = statistics.median(
                asyncio.run(throughput(url, batch, args.new_tokens)) for _ in range(args.repeats)
            )
            engine = engine_batch(folder, batch, args.new_tokens, args.repeats)
            figures["throughput"] = {
                "clients": len(batch),
                "one_client_tokens_per_s": round(one, 1),
                "server_tokens_per_s": round(many, 1),
                "engine_batch_tokens_per_s": round(engine, 1),
                "server_vs_engine": round(many / engine, 3),
                "server_vs_one_client": round(many / one, 2),
            }
            print(json.dumps(figures["throughput"]), flush=True)
            if not args.skip_load:
                figures["load"] = asyncio.run(load(url, args, prompts))
                print(json.dumps(figures["load"]), flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print(json.dumps(figures))
    load_ok = "load" not in figures or (
        figures["load"]["failed"] == 0
        and figures["load"]["streams_ending_with_done"] == figures["load"]["requests"]
        and figures["load"]["usage_equals_tokens_received"] == figures["load"]["requests"]
        and figures["load"]["health_p99_ms"] < 100
    )
    os._exit(0 if load_ok else 1)


if __name__ == "__main__":
    main()
