"""Serving throughput: vLLM's OpenAI server against transformers' `generate` on the same model.

    .venv/bin/python bench/serve_throughput.py --domain finance               # the merged model
    .venv/bin/python bench/serve_throughput.py --domain finance --stage base  # before a merge exists
    .venv/bin/python bench/serve_throughput.py serve.quantization=int8 serve.compile=true  # fastest on a CPU

At 1, 4 and 16 concurrent streams it prints requests/s, output tokens/s and p50/p95 time to first token.
Every request asks for exactly --max-tokens new tokens (vLLM `ignore_eos`, transformers `min_new_tokens`)
so both sides do the same work. vLLM: N client threads, each streaming its requests one after another with
the official `openai` client (continuous batching happens in the server). transformers: its best plain
setting, the N prompts of a round as one left-padded batch to `generate` (greedy, KV cache); its time to
first token is when the first decoding step's logits are ready, the same moment for the whole batch. Also
printed: vLLM against a transformers server that answers one request at a time (its 1-stream rate). The
vLLM server is started by serve.launch with the pack's serve settings; the target is vLLM >= 5x the
transformers output tokens/s at 16 streams.

On the CPU it also prints the floor under any server's decoding step on this machine: the model's matrix
multiplies for N sequences (the fused q/k/v and gate/up projections, o, down and the LM head) timed with
oneDNN on prepacked weights, which is what vLLM's CPU backend calls, and with torch.nn.functional.linear,
which is what transformers calls. A decoding step cannot be faster than its matrix multiplies, so N divided
by that time is a ceiling on the tokens/s of N streams, before attention, sampling, HTTP or prefill.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "What is compound interest? Explain with an example.",
    "How does a bond's price move when interest rates rise?",
    "Explain the difference between a stock and a bond.",
    "What is an index fund?",
    "How do I compute the annual percentage yield from a monthly rate?",
    "What does a company's balance sheet show?",
    "Explain diversification in two paragraphs.",
    "What is inflation and how is it measured?",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(wall: float, ttfts: list[float], tokens: int, requests: int) -> dict:
    return {"requests": requests, "wall_s": round(wall, 2), "req_per_s": requests / wall,
            "out_tok_per_s": tokens / wall, "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p95_s": percentile(ttfts, 0.95)}


def messages(i: int, system: str) -> list[dict]:
    sys_msg = [{"role": "system", "content": system}] if system else []
    return sys_msg + [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


# ---------------------------------------------------------------------------------------------- vLLM


def bench_vllm(url: str, key: str, model: str, streams: int, rounds: int, max_tokens: int, system: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
    ttfts, tokens, errors = [], [], []
    lock = threading.Lock()

    def worker(w: int):
        for r in range(rounds):
            start = time.perf_counter()
            first, count = None, 0
            try:
                stream = client.chat.completions.create(
                    model=model, messages=messages(w * rounds + r, system), max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        count = chunk.usage.completion_tokens
            except Exception as e:  # recorded and reported: a failed request must not pass as fast
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                ttfts.append(first if first is not None else float("nan"))
                tokens.append(count)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} vLLM requests failed, first: {errors[0]}")
    return summary(wall, ttfts, sum(tokens), len(tokens))


# -------------------------------------------------------------------------------------- transformers


def bench_transformers(model, tokenizer, streams: int, rounds: int, max_tokens: int, system: str) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        """Called once per decoding step; the first call is when the first token's logits exist."""

        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                if scores.is_cuda:
                    torch.cuda.synchronize()
                self.at = time.perf_counter()
            return scores

    ttfts, tokens, wall = [], 0, 0.0
    for r in range(rounds):
        texts = [tokenizer.apply_chat_template(messages(w * rounds + r, system), tokenize=False,
                                               add_generation_prompt=True) for w in range(streams)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        hook = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([hook]), pad_token_id=tokenizer.pad_token_id)
        if out.is_cuda:
            torch.cuda.synchronize()
        wall += time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1]:]
        tokens += int((new != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else new.numel()
        ttfts += [hook.at - start] * streams
    return summary(wall, ttfts, tokens, streams * rounds)


# ----------------------------------------------------------------------------- matrix-multiply floor


def decode_matmuls(model) -> list:
    """The weight matrices one decoding step multiplies by, fused the way vLLM fuses Llama-family layers
    (q/k/v into one matrix, gate/up into one); other architectures are taken one Linear at a time."""
    import torch

    mats = []
    for layer in model.model.layers:
        linears = {name.rsplit(".", 1)[-1]: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if all(g in linears for g in group):
                mats.append(torch.cat([linears.pop(g).weight.detach() for g in group]))
        mats += [m.weight.detach() for m in linears.values()]
    mats.append(model.get_output_embeddings().weight.detach())
    return mats


def matmul_floor(model, levels: list[int], reps: int = 5) -> dict:
    """Best-of-`reps` milliseconds for one decoding step's matrix multiplies at each number of sequences:
    oneDNN with prepacked weights (vLLM's CPU GEMM, when the vLLM build has it) and torch's linear."""
    import torch

    mats = [w.float().contiguous() for w in decode_matmuls(model)]
    try:
        from vllm import _custom_ops as ops
        handles = [ops.create_onednn_mm(w.t(), 32) for w in mats] if ops._supports_onednn else None
    except Exception:  # another vLLM build: report torch's number only
        handles = None

    def best(step, n: int) -> float:
        inputs = {k: torch.randn(n, k) for k in {w.shape[1] for w in mats}}
        step(inputs)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step(inputs)
            times.append(time.perf_counter() - start)
        return min(times) * 1000

    out = {"weights_mb": sum(w.numel() for w in mats) * 4 / 1e6}
    with torch.inference_mode():
        for n in levels:
            row = {"torch_linear_ms": best(lambda x: [torch.nn.functional.linear(x[w.shape[1]], w) for w in mats], n)}
            if handles:
                row["onednn_ms"] = best(lambda x: [ops.onednn_mm(h, x[w.shape[1]], None)
                                                   for h, w in zip(handles, mats)], n)
            fastest = min(row.values())
            row["ceiling_tok_per_s"] = n / fastest * 1000
            out[n] = row
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from core.errors import PackError
    from core.layout import runs_dir
    from core.pack import load_pack

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="finance")
    ap.add_argument("--stage", default="merge", help="whose model: merge (default) or base, cpt, sft, pref")
    ap.add_argument("--streams", default="1,4,16", help="concurrency levels, comma separated")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (exactly)")
    ap.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="transformers dtype (float32: the faster one on CPUs without native bf16)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU cores for each side: vLLM computes on the first N, transformers uses N torch "
                         "threads (default all; on a machine shared with other work 1 gives stable numbers, "
                         "since spinning OpenMP threads stall when the OS takes a core away)")
    ap.add_argument("--skip-hf", action="store_true", help="only vLLM")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides, e.g. serve.dtype=float32")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",")]

    from core.layout import model_dir
    from serve.engine import on_cuda, serve_dtype, start_vllm, stop, wait_ready

    try:
        pack = load_pack(args.domain, args.overrides)
        model = model_dir(runs_dir() / pack.name, args.stage)
    except PackError as e:
        print(e.render(), file=sys.stderr)
        return 2
    print(f"model: {model} (stage {args.stage}); {args.max_tokens} new tokens per request, "
          f"{args.rounds} requests per stream; vLLM dtype {serve_dtype(pack.serve.dtype, on_cuda())}, transformers {args.hf_dtype}; "
          f"{args.threads} CPU thread(s) each")

    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "sk-bench"
    log = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
    results = {"model": str(model), "max_tokens": args.max_tokens, "vllm": {}, "transformers": {}}
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))
    served = model
    if pack.serve.quantization == "int8":  # vLLM serves the int8 copy `make serve` would; transformers the original
        from serve.quantize import int8_copy, pack_texts

        calibration, held_out = pack_texts(pack, model)
        served = int8_copy(model, runs_dir() / pack.name / "serve" / "int8" / ("tuned" if args.stage == "merge" else
                                                                              args.stage), calibration, held_out)
        print(f"vLLM serves the int8 W8A8 copy {served}; transformers the {args.hf_dtype} original")
    child = start_vllm("tuned", served, ["bench"], "127.0.0.1", port, key, pack.serve, log, cpus=cpus)
    try:
        wait_ready([child], key, pack.serve.ready_timeout_s)
        bench_vllm(child.url, key, "bench", 2, 1, 8, pack.system_prompt)  # warm-up
        for n in levels:
            results["vllm"][n] = r = bench_vllm(child.url, key, "bench", n, args.rounds, args.max_tokens,
                                                pack.system_prompt)
            print(f"vllm         streams={n:3d}  {r['req_per_s']:6.2f} req/s  {r['out_tok_per_s']:7.1f} tok/s  "
                  f"TTFT p50 {r['ttft_p50_s']:.3f}s p95 {r['ttft_p95_s']:.3f}s", flush=True)
    finally:
        stop([child])

    if not args.skip_hf:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        device = "cuda" if on_cuda() else "cpu"  # the baseline runs where vLLM ran
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.hf_dtype)).to(device).eval()
        bench_transformers(hf, tokenizer, 1, 1, 4, pack.system_prompt)  # warm-up
        for n in levels:
            results["transformers"][n] = r = bench_transformers(hf, tokenizer, n, args.rounds, args.max_tokens,
                                                                pack.system_prompt)
            print(f"transformers streams={n:3d}  {r['req_per_s']:6.2f} req/s  {r['out_tok_per_s']:7.1f} tok/s  "
                  f"TTFT p50 {r['ttft_p50_s']:.3f}s p95 {r['ttft_p95_s']:.3f}s", flush=True)
        print("\nvLLM / transformers output tokens/s:")
        for n in levels:
            ratio = results["vllm"][n]["out_tok_per_s"] / results["transformers"][n]["out_tok_per_s"]
            results.setdefault("speedup", {})[n] = ratio
            mark = ("  (target >= 5x: " + ("met" if ratio >= 5 else "NOT met") + ")") if n == 16 else ""
            print(f"  streams={n:3d}  {ratio:5.2f}x{mark}")
        if 1 in levels:  # a server that calls generate for one request at a time serves N streams at the 1-stream rate
            one = results["transformers"][1]["out_tok_per_s"]
            results["speedup_vs_one_at_a_time"] = {n: results["vllm"][n]["out_tok_per_s"] / one for n in levels}
            print("vLLM / transformers serving one request at a time (its 1-stream rate):")
            for n in levels:
                print(f"  streams={n:3d}  {results['speedup_vs_one_at_a_time'][n]:5.2f}x")
        if device == "cpu":
            results["matmul_floor"] = floor = matmul_floor(hf, levels)
            print(f"\nFloor of a float32 decoding step on this CPU: its matrix multiplies alone "
                  f"({floor['weights_mb']:.0f} MB of weights; best of 5"
                  f"{'; the int8 server multiplies a quarter of the bytes' if served != model else ''}):")
            for n in levels:
                row = floor[n]
                onednn = f"oneDNN (vLLM) {row['onednn_ms']:6.1f} ms, " if "onednn_ms" in row else ""
                print(f"  sequences={n:3d}  {onednn}torch linear (transformers) {row['torch_linear_ms']:6.1f} ms"
                      f"  -> at most {row['ceiling_tok_per_s']:6.1f} tok/s of float32 decoding")
            if 16 in levels:
                need = 5 * results["transformers"][16]["out_tok_per_s"]
                print(f"  5x the transformers baseline at 16 streams needs {need:.1f} tok/s; the matmul ceiling is "
                      f"{floor[16]['ceiling_tok_per_s']:.1f} tok/s before attention, sampling, HTTP and prefill")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
