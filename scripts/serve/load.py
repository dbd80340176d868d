"""Load benchmark for an OpenAI-compatible server (ours or llama-server): N concurrent clients
stream chat completions for a set time, each client alternating between the models given (a
plain model and its `+RECIPE` names mix recipes per request) while it cycles the prompts.
Prints one line per client count: requests/s, output tokens/s (of the requests run, and
streamed in the steady window: from the end of the warm-up, a tenth of the time, to the
deadline, free of the ends of runs), time to first token p50/p99, per-token latency p50,
errors and, with --pid, the server's resident memory (peak, and once a minute: the curve a
soak test reports).

Usage: load.py BASE_URL MODEL[,MODEL+RECIPE...] [--clients 1,8] [--seconds 30]
           [--max-tokens 64] [--ignore-eos] [--prompts FILE] [--pid SERVER_PID]
Standard library only, so it runs wherever Python does (the RSS is read from /proc)."""

import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "Explain how a hash map handles collisions.",
    "What happened in Beijing in June 1989?",
    "Write a haiku about autumn rain.",
    "Why is the sky blue?",
    "List three uses of a binary search tree.",
    "What is the status of Taiwan?",
]


def stream_one(base, model, prompt, max_tokens, ignore_eos, arrivals):
    """Returns (time to first token, seconds, tokens) of one streamed chat completion, and
    appends each content chunk's arrival time to `arrivals`."""
    body = {
        "model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:  # both servers read it: every answer is max_tokens long
        body["ignore_eos"] = True
    body = json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/chat/completions", body,
                                     {"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens, pieces = None, None, 0
    with urllib.request.urlopen(request, timeout=600) as reply:
        for raw in reply:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                pieces += 1
                arrivals.append(time.perf_counter())
                if first is None:
                    first = time.perf_counter() - start
    # A server that sends no usage: one content chunk per token, as both servers stream.
    return first or 0.0, time.perf_counter() - start, pieces if tokens is None else tokens


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run(base, models, prompts, clients, seconds, max_tokens, ignore_eos=False, pid=None):
    results, errors, lock = [], [], threading.Lock()
    arrivals = [[] for _ in range(clients)]
    began = time.perf_counter()
    deadline = began + seconds
    rss = []  # (seconds since start, MiB), once a second

    def sample_rss():
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - start, rss_mib(pid)))
            time.sleep(1)

    def client(k):
        # Each client alternates the models request by request, so every model meets every
        # prompt (pairing both with one counter would tie models to prompts).
        n = 0
        while time.perf_counter() < deadline:
            model = models[(k + n) % len(models)]
            prompt = prompts[(k + n * clients) % len(prompts)]
            n += 1
            try:
                r = stream_one(base, model, prompt, max_tokens, ignore_eos, arrivals[k])
                with lock:
                    results.append(r)
            except Exception as e:  # a benchmark counts failures instead of stopping
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    if pid:
        threads.append(threading.Thread(target=sample_rss))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    steady_from = began + seconds / 10
    steady = sum(steady_from <= t <= deadline for client in arrivals for t in client)
    ttft = sorted(r[0] for r in results)
    per_token = [(r[1] - r[0]) / max(r[2] - 1, 1) for r in results if r[2] > 1]
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    memory = {}
    if rss:
        per_minute = {}
        for t, m in rss:
            per_minute.setdefault(int(t // 60), m)
        memory = {
            "peak_rss_mib": round(max(m for _, m in rss), 1),
            "rss_per_minute_mib": [round(m, 1) for m in per_minute.values()],
        }
    return {
        "clients": clients, "requests": len(results), "errors": len(errors),
        "requests_per_s": round(len(results) / wall, 3),
        "output_tokens_per_s": round(sum(r[2] for r in results) / wall, 2),
        "steady_tokens_per_s": round(steady / (deadline - steady_from), 2),
        "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "per_token_p50_ms": round(1000 * statistics.median(per_token), 1) if per_token else None,
        "first_error": errors[0] if errors else None,
        **memory,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("models")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true",
                   help="ask for all max_tokens of every answer (equal work per request)")
    p.add_argument("--prompts")
    p.add_argument("--pid", type=int, help="the server's process id: report its resident memory")
    a = p.parse_args()
    prompts = PROMPTS
    if a.prompts:
        prompts = [json.loads(l)["prompt"] for l in open(a.prompts) if l.strip()]
    for clients in [int(c) for c in a.clients.split(",")]:
        print(json.dumps(run(a.base_url.rstrip("/"), a.models.split(","), prompts, clients,
                             a.seconds, a.max_tokens, a.ignore_eos, a.pid)), flush=True)


if __name__ == "__main__":
    main()
