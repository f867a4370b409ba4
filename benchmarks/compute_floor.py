"""How far each method's training iteration is from its compute floor, measured in one process.

The floor of an iteration is the work of its networks alone: every call the script makes to a module
with parameters (the networks, and learned method modules such as ICL's class decoders or UC-Seg's
UPG), forward with autograd where the script had it, one backward through all of them, and the
optimizer steps. Everything else (loading and augmenting the batch, losses, pseudo-labels, masks,
logging) is what the ratio measured / floor puts on top.

How: the script runs --iterations iterations in this process (as `python train_<m>.py ...` would,
quick-protocol flags, validation off; the scripts scale their warm-ups and stage switches to the run
length, so every term runs from the recorded iteration on). A forward hook records the top-level module calls of iteration
--record (inputs, grad mode, autocast state, which outputs the backward reached). From then on, after
every iteration the script makes, those calls are replayed once on the same modules with the same
inputs and timed apart: iteration and floor alternate, so the machine's load (noisy here) hits both
alike. Medians over the iterations after --skip and over all --repeats runs: the measured s/it, the
floor, and the time spent waiting for the loader (reading and augmenting a batch in the main process,
the CPU default of 0 workers) within the measured iterations.

    python benchmarks/compute_floor.py --root_path data/ACDC supervised cifp ducisc icl ucseg dualnet_kl
    python benchmarks/compute_floor.py --root_path data/ACDC --amp supervised       # bfloat16 on the CPU
Appends one row per method to benchmarks/results/compute_floor.csv.
"""
import argparse
import contextlib
import csv
import io
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402

QUICK = ["--dataset", "ACDC", "--patch_size", "128", "128", "--batch_size", "8", "--labeled_bs", "4",
         "--base_lr", "0.01", "--lr_schedule", "poly", "--seed", "1337", "--labeled_num", "7", "--val_split", "none"]


class Recorder:
    """Forward hooks on every module: the calls made from the script itself (not from inside another
    recorded module) to modules with parameters, during one chosen iteration."""

    def __init__(self):
        self.calls, self.used, self.active, self.depth = [], [], False, 0
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self.pre),
                        torch.nn.modules.module.register_module_forward_hook(self.post)]

    @staticmethod
    def owns_parameters(module):
        return any(True for _ in module.parameters())

    def pre(self, module, inputs):
        if self.active and self.depth == 0 and self.owns_parameters(module):
            keep = lambda x: x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else \
                [keep(v) for v in x] if isinstance(x, (list, tuple)) else x
            autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
            self.calls.append((module, [keep(x) for x in inputs], torch.is_grad_enabled(), autocast))
        self.depth += 1

    def post(self, module, inputs, output):
        self.depth -= 1
        if self.active and self.depth == 0 and self.calls and self.calls[-1][0] is module:
            used = [False] * len(list(tensors(output)))   # which outputs the backward reached
            for i, t in enumerate(tensors(output)):
                if t.requires_grad:
                    t.register_hook(lambda g, i=i, used=used: used.__setitem__(i, True))
            self.used.append(used)

    def remove(self):
        for h in self.handles:
            h.remove()


def tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)


def replay(calls, used, optimizers):
    """One floor pass: the recorded calls, one backward from the outputs the script's backward reached,
    the optimizer steps. The backward gets a zero gradient (the same work, no change to the weights
    beyond weight decay and momentum), so the run it is interleaved with trains on. Returns seconds."""
    t0 = time.perf_counter()
    total = 0
    for (module, inputs, grad, (amp, dtype)), reached in zip(calls, used):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=amp):
            out = module(*inputs)
        for t, r in zip(tensors(out), reached):
            if r:
                total = total + t.float().sum()
    for opt in optimizers:
        opt.zero_grad()
    if torch.is_tensor(total):
        (total * 0).backward()
    for opt in optimizers:
        opt.step()
    return time.perf_counter() - t0


def measure(method, args, workdir):
    """Run the script; after each iteration past --skip, one floor replay (timed apart). Returns (s/it of
    those iterations, floor replay times, loader times within those iterations, passes description)."""
    seen, steps, floors, loading, recorder = {"t0": None, "n": 0}, [], [], [], Recorder()
    init, step, batches = common.Run.__init__, common.Run.step, common.Run.batches

    def run_init(self, *a, **kw):
        seen["optimizers"] = [o for o in kw.get("optimizers", {}).values() if isinstance(o, torch.optim.Optimizer)]
        init(self, *a, **kw)

    def run_step(self, iteration, values):
        step(self, iteration, values)
        now = time.perf_counter()
        seen["n"] += 1
        timed = seen["n"] > args.skip and seen["t0"] is not None
        if timed:
            steps.append(now - seen["t0"])
            loading.append(seen["loader"])
        recorder.active = seen["n"] == args.record  # record the iteration after --record steps
        if timed and recorder.calls and not recorder.active:
            floors.append(replay(recorder.calls, recorder.used, seen["optimizers"]))
        seen["t0"] = time.perf_counter()

    def run_batches(self, loader):  # times the loader: reading and augmenting a batch
        it = batches(self, loader)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            seen["loader"] = time.perf_counter() - t0
            yield item

    common.Run.__init__, common.Run.step, common.Run.batches = run_init, run_step, run_batches
    argv = [str(REPO / f"train_{method}.py"), *QUICK, "--root_path", args.root_path, "--max_iterations",
            str(args.iterations), "--exp", "floor", "--model_dir", str(Path(workdir) / f"{method}_{time.time_ns()}"),
            "--threads", str(args.threads), *(["--amp"] if args.amp else [])]
    saved = sys.argv, os.getcwd()
    try:
        sys.argv = argv
        os.chdir(REPO)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        common.Run.__init__, common.Run.step, common.Run.batches = init, step, batches
        recorder.remove()
    passes = []  # "UNet x4" per call, runs of equal calls counted: "UNetEncoder x4 (3 calls)"
    for (m, inputs, _, _), reached in zip(recorder.calls, recorder.used):
        batch = next(tensors(inputs)).shape[0] if any(True for _ in tensors(inputs)) else "?"
        name = f"{type(m).__name__} x{batch}" + ("" if any(reached) else " (no backward)")
        if passes and passes[-1][0] == name:
            passes[-1][1] += 1
        else:
            passes.append([name, 1])
    passes = "; ".join(n + (f" ({k} calls)" if k > 1 else "") for n, k in passes)
    return steps, floors, loading, passes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("methods", nargs="+", help="method names (train_<name>.py)")
    p.add_argument("--root_path", required=True)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--skip", type=int, default=12, help="iterations left out of the medians (start-up); >= --record")
    p.add_argument("--record", type=int, default=12,
                   help="the iteration whose module calls are the floor: after every stage switch of the scaled "
                        "schedules (at 30 iterations: DuCiSC's warm-up ends at 4, UC-Seg's copy-paste starts at 7)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, methods interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="--amp for the scripts (bfloat16 on a CPU that has it)")
    p.add_argument("--label", default="", help="a note stored with the rows (e.g. 'before')")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compute_floor.csv"))
    args = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    results = {m: ([], [], [], "") for m in args.methods}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.repeats):
            for m in args.methods:
                steps, floors, loading, passes = measure(m, args, workdir)
                results[m] = (results[m][0] + steps, results[m][1] + floors, results[m][2] + loading, passes)
                print(f"repeat {r + 1} {m}: {statistics.median(steps):.3f} s/it, floor {statistics.median(floors):.3f} s, "
                      f"loader {statistics.median(loading):.3f} s", flush=True)
    new = not Path(args.out).exists()
    with open(args.out, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "commit", "label", "method", "precision", "threads", "measured_s_per_it",
                        "floor_s_per_it", "ratio", "loader_s_per_it", "ratio_without_loader", "passes"])
        for m, (steps, floors, loading, passes) in results.items():
            s, fl, ld = statistics.median(steps), statistics.median(floors), statistics.median(loading)
            print(f"{m:12s} measured {s:.3f} s/it  floor {fl:.3f} s  ratio {s / fl:.2f}  loader {ld:.3f} s  "
                  f"(measured - loader) / floor {(s - ld) / fl:.2f}  [{passes}]")
            w.writerow([time.strftime("%Y-%m-%d %H:%M"), commit, args.label, m, "bf16" if args.amp else "fp32",
                        args.threads, round(s, 4), round(fl, 4), round(s / fl, 3), round(ld, 4),
                        round((s - ld) / fl, 3), passes])


if __name__ == "__main__":
    main()
