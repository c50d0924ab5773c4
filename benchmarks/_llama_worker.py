"""A llama-cpp-python worker for the benchmarks, run by *another* interpreter (the venv that has
llama_cpp): ``<python> benchmarks/_llama_worker.py MODEL THREADS``.

It reads one JSON request per line on stdin and answers one JSON line on stdout, so a benchmark
can interleave llama.cpp with its own variants round by round (the worker waits, idle, in
between). Requests (token ids are the benchmark's own tokenisation, so both sides see the same
input):

* ``{"op": "generate", "ids": [...], "n": 64}`` -> ``{"tokens": [...], "seconds": s, "cpu": s}``
  greedy, stopping at EOS or after ``n`` tokens; ``cpu``: this process's CPU seconds.
* ``{"op": "logits", "ids": [...], "out": "/path.npy"}`` -> ``{"ok": true}``: the logits after
  the last id, saved as float32.
* ``{"op": "quit"}``.

Only the standard library, numpy and llama_cpp are imported (no kernel_ext, no torch).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import llama_cpp
    import numpy as np

    path, threads = argv[0], int(argv[1])
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    eos = llm.token_eos()
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        if op == "generate":
            tokens: list[int] = []
            c0, t0 = time.process_time(), time.perf_counter()
            for tok in llm.generate(req["ids"], temp=0.0, reset=True):
                tokens.append(int(tok))
                if tok == eos or len(tokens) >= int(req["n"]):
                    break
            reply = {"tokens": tokens, "seconds": time.perf_counter() - t0,
                     "cpu": time.process_time() - c0}
        elif op == "logits":
            llm.reset()
            llm.eval(req["ids"])  # without logits_all only the last position has logits
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            np.save(req["out"], np.array(logits, dtype=np.float32))
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
