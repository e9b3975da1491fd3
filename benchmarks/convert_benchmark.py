"""Benchmark `convert_checkpoint` against the I/O floor and against the naive route.

    python benchmarks/convert_benchmark.py --out convert.json          # ~1.1B params, bf16
    python benchmarks/convert_benchmark.py --small                     # a quick smoke run

In one run it:
1. writes a synthetic Llama checkpoint (TinyLlama-1.1B shape, random bf16 values) as sharded
   safetensors, generating and writing one tensor at a time (never the whole model in memory);
2. (a) times `convert_checkpoint` against `shutil.copyfile` of the same shard files (the I/O
   floor), alternating copy and convert `--repeats` times, each in a fresh subprocess that
   times only the work itself (not Python imports). Before every timed run the source shards
   are read once, so both start from a warm page cache (or, with --cold, the page cache is
   dropped instead, which needs root). Neither fsyncs;
3. (b) measures peak RSS (the child's own VmHWM, i.e. its maxrss) of the conversion against the naive
   route - `AutoModelForCausalLM.from_pretrained` -> pool k/v weights, edit config ->
   `save_pretrained` - each in a subprocess. The parent also samples the child's RSS split into
   anonymous memory and file-backed (memory-mapped) pages with psutil;
4. checks the two routes wrote the same tensors, prints a table, writes JSON to --out, and
   deletes everything it wrote.

Targets (issue 2): convert time <= 1.5x copy time; convert peak RSS <= 25% of the naive peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

WEIGHTS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LlamaSpec:
    """Shape of the synthetic model (defaults: TinyLlama-1.1B, 32 query / 4 KV heads)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in checkpoint order; untied lm_head."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "bfloat16",
        }


def spec_for(params: float, small: bool) -> LlamaSpec:
    """TinyLlama widths with as many layers as reach `params` (a tiny model for --small)."""
    if small:
        return LlamaSpec(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, vocab=4096)
    base = LlamaSpec(layers=0)
    per_layer = LlamaSpec(layers=1).params() - base.params()
    return LlamaSpec(layers=max(1, math.ceil((params - base.params()) / per_layer)))


# --- synthetic checkpoint ----------------------------------------------------------------------


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    return shards + [cur]


def write_synthetic(spec: LlamaSpec, folder: Path, shard_bytes: int, seed: int = 0) -> int:
    """Write config + bf16 safetensors shards + index, one tensor generated at a time; bytes written."""
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec.config(), indent=2))
    shards = plan_shards(spec.tensors(), shard_bytes)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm weights
                else:
                    t = (torch.randn(shape) * 0.02).to(torch.bfloat16)
                fh.write(memoryview(t.view(torch.uint8).numpy()))
                weight_map[name] = fname
                del t
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHTS_SUFFIX) or p.name.endswith(".index.json"))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm(folder: Path) -> None:
    """Read every shard once so the timed run finds them in the page cache."""
    for p in shard_files(folder):
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        sys.exit(f"convert_benchmark: --cold needs root to drop the page cache ({err}); run without --cold")


# --- the three routes, each run in a child process -------------------------------------------


def child_copy(src: Path, dst: Path, args) -> None:
    dst.mkdir()
    for p in shard_files(src):
        shutil.copyfile(p, dst / p.name)


def child_convert(src: Path, dst: Path, args) -> None:
    from gqa_convert.convert import convert_checkpoint

    convert_checkpoint(src, dst, args.kv_heads, max_shard_size=args.max_shard_size, progress=False)


def child_naive(src: Path, dst: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    cfg = model.config
    old, new, d = cfg.num_key_value_heads, args.kv_heads, cfg.head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            w = proj.weight.data
            pooled = w.view(new, old // new, d, w.shape[1]).float().mean(1).reshape(new * d, -1).to(w.dtype)
            proj.weight = torch.nn.Parameter(pooled, requires_grad=False)
            proj.out_features = new * d
        attn.num_key_value_groups = cfg.num_attention_heads // new
    cfg.num_key_value_heads = new
    model.save_pretrained(dst, max_shard_size=args.max_shard_size)


def child_idle(src: Path, dst: Path, args) -> None:
    """Imports only: the interpreter + torch + transformers floor both routes share."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import gqa_convert.convert  # noqa: F401


CHILDREN = {"copy": child_copy, "convert": child_convert, "naive": child_naive, "idle": child_idle}


def peak_rss_self() -> int:
    """This process's peak RSS in bytes: VmHWM on Linux (getrusage's maxrss keeps the forking
    parent's RSS across exec, which would charge every child with the benchmark's own torch)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; an upper bound


def run_child_main(args) -> None:
    """In the child: import what the route needs, then time only the work; print one JSON line."""
    if args.child in ("convert", "naive", "idle"):
        import torch

        torch.set_num_threads(1)
        import transformers  # noqa: F401  (imports are not part of the timed work)

        import gqa_convert.convert  # noqa: F401
    cpu0, start = cpu_seconds(), time.perf_counter()
    CHILDREN[args.child](Path(args.src), Path(args.dst), args)
    if args.durable and Path(args.dst).is_dir():
        fsync_folder(Path(args.dst))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "maxrss_bytes": peak_rss_self()}))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def fsync_folder(folder: Path) -> None:
    """Flush every written file to disk (the --durable timing includes this)."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_child(mode: str, src: Path, dst: Path, args, durable: bool = False) -> dict:
    """Run one route in a subprocess; its own timing and maxrss, plus sampled anon/file RSS."""
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--src", str(src), "--dst", str(dst),
           "--kv-heads", str(args.kv_heads), "--max-shard-size", args.max_shard_size]  # fmt: skip
    if durable:
        cmd.append("--durable")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"rss": 0, "anon": 0, "file": 0}

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                m = p.memory_info()
                peaks["rss"] = max(peaks["rss"], m.rss)
                peaks["anon"] = max(peaks["anon"], m.rss - m.shared)
                peaks["file"] = max(peaks["file"], m.shared)
                time.sleep(0.02)
        except psutil.Error:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"convert_benchmark: the {mode} child failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(sampled_peak_rss=peaks["rss"], sampled_peak_anon=peaks["anon"], sampled_peak_file=peaks["file"])
    return result


def same_tensors(a: Path, b: Path, names: list[str]) -> bool:
    """The converter's and the naive route's outputs hold equal tensors under these names."""
    import torch
    from safetensors import safe_open

    def where(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    for name in names:
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


# --- driver ----------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.1e9, help="synthetic model size (default 1.1e9)")
    ap.add_argument("--small", action="store_true", help="quick smoke run on a ~20M-parameter model")
    ap.add_argument("--kv-heads", type=int, default=2, help="target KV heads (source has 4)")
    ap.add_argument("--source-shard-size", default="1GB", help="shard size of the synthetic source")
    ap.add_argument("--max-shard-size", default="1GB", help="output shard size, both routes")
    ap.add_argument("--repeats", type=int, default=3, help="alternating copy/convert timings per mode")
    ap.add_argument(
        "--modes",
        default="cached,durable",
        help="timing modes: cached (writes may stay in the page cache), durable (fsync inside the timing)",
    )
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed run (root)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the from_pretrained route")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: system temp)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    # internal: run one route in a child process
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    ap.add_argument("--durable", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child_main(args)
        return 0

    from gqa_convert.units import parse_size

    spec = spec_for(args.params, args.small)
    if args.small:
        args.source_shard_size = args.max_shard_size = "20MB"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"cached", "durable"}:
        ap.error(f"--modes takes cached and/or durable, got {args.modes!r}")
    work = Path(tempfile.mkdtemp(prefix="gqa-convert-bench-", dir=args.workdir))
    try:
        src = work / "source"
        t0 = time.perf_counter()
        nbytes = write_synthetic(spec, src, parse_size(args.source_shard_size))
        gen_s = time.perf_counter() - t0
        print(f"synthetic Llama: {spec.params() / 1e9:.3f}B params, {gib(nbytes)} bf16 in "
              f"{len(shard_files(src)) - 1} shards, written in {gen_s:.1f} s", flush=True)  # fmt: skip

        def prepare() -> None:
            """Same start for every timed run: no dirty pages left from the previous one, and the
            source in the page cache (or, with --cold, nothing in it)."""
            os.sync()
            drop_caches() if args.cold else warm(src)

        # One untimed copy + convert first: the VM backs guest memory lazily, so the first writes
        # into fresh page-cache pages are several times slower than later ones.
        for mode in ("copy", "convert"):
            prepare()
            run_child(mode, src, work / "warmup", args)
            shutil.rmtree(work / "warmup")

        timings: dict[str, dict[str, list[dict]]] = {}
        for tmode in modes:
            runs = timings[tmode] = {"copy": [], "convert": []}
            for rep in range(args.repeats):
                for route in ("copy", "convert") if rep % 2 == 0 else ("convert", "copy"):
                    prepare()
                    runs[route].append(run_child(route, src, work / "timed", args, durable=tmode == "durable"))
                    r = runs[route][-1]
                    print(f"  {tmode:7s} {route:8s} run {rep + 1}: {r['seconds']:6.2f} s wall, "
                          f"{r['cpu_seconds']:5.2f} s cpu", flush=True)  # fmt: skip
                    shutil.rmtree(work / "timed")

        # Peak memory: one more conversion (kept, to compare with the naive output), the naive route,
        # and a child that only imports what both routes import.
        prepare()
        conv = run_child("convert", src, work / "converted", args)
        idle = run_child("idle", src, work / "idle", args)
        naive = check = None
        if not args.skip_naive:
            prepare()
            naive = run_child("naive", src, work / "naive", args)
            print(f"  naive route: {naive['seconds']:.2f} s", flush=True)
            names = [
                "model.layers.0.self_attn.k_proj.weight",
                f"model.layers.{spec.layers - 1}.self_attn.v_proj.weight",
                "model.layers.0.mlp.down_proj.weight",
                "lm_head.weight",
            ]
            check = same_tensors(work / "converted", work / "naive", names)

        summary = {}
        for tmode, runs in timings.items():
            copy_s = statistics.median(r["seconds"] for r in runs["copy"])
            conv_s = statistics.median(r["seconds"] for r in runs["convert"])
            summary[tmode] = {
                "copy_seconds_median": copy_s,
                "convert_seconds_median": conv_s,
                "time_ratio": conv_s / copy_s,
                "copy_seconds_min": min(r["seconds"] for r in runs["copy"]),
                "convert_seconds_min": min(r["seconds"] for r in runs["convert"]),
                "copy_cpu_median": statistics.median(r["cpu_seconds"] for r in runs["copy"]),
                "convert_cpu_median": statistics.median(r["cpu_seconds"] for r in runs["convert"]),
            }
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_average_at_end": os.getloadavg(),
            },
            "model": {**asdict(spec), "params": spec.params(), "bytes": nbytes, "dtype": "bfloat16"},
            "settings": {
                "kv_heads": f"{spec.kv_heads}->{args.kv_heads}",
                "source_shard_size": args.source_shard_size,
                "max_shard_size": args.max_shard_size,
                "repeats": args.repeats,
                "page_cache": "dropped before each run" if args.cold else "source read once before each run",
                "before_each_run": "os.sync()",
                "modes": {"cached": "no fsync", "durable": "outputs fsynced inside the timing"},
            },
            "generate_seconds": gen_s,
            "timings": timings,
            "summary": summary,
            "time_target": 1.5,
            "memory": {"convert": conv, "naive": naive, "idle": idle},
            "output_bytes": folder_bytes(work / "converted"),
        }
        if naive:
            result["memory"].update(
                rss_ratio=conv["maxrss_bytes"] / naive["maxrss_bytes"],
                rss_ratio_above_imports=(conv["maxrss_bytes"] - idle["maxrss_bytes"])
                / (naive["maxrss_bytes"] - idle["maxrss_bytes"]),
                anon_ratio=conv["sampled_peak_anon"] / max(1, naive["sampled_peak_anon"]),
                rss_target=0.25,
                outputs_agree=check,
            )

        print(f"\n{'timing (median of ' + str(args.repeats) + ')':34s} {'copy':>9s} {'convert':>9s} {'ratio':>7s}"
              f" {'copy cpu':>9s} {'conv cpu':>9s}")  # fmt: skip
        for tmode, sm in summary.items():
            print(f"{tmode:34s} {sm['copy_seconds_median']:8.2f}s {sm['convert_seconds_median']:8.2f}s "
                  f"{sm['time_ratio']:6.2f}x {sm['copy_cpu_median']:8.2f}s {sm['convert_cpu_median']:8.2f}s")  # fmt: skip
        print(f"\n{'peak memory':44s} {'peak RSS':>10s} {'peak anon':>10s} {'peak file':>10s}")
        rows = [("convert_checkpoint", conv), ("imports only (python+torch+transformers)", idle)]
        if naive:
            rows.append(("naive from_pretrained/edit/save_pretrained", naive))
        for name, r in rows:
            print(f"{name:44s} {gib(r['maxrss_bytes']):>10s} {gib(r['sampled_peak_anon']):>10s} "
                  f"{gib(r['sampled_peak_file']):>10s}")  # fmt: skip
        print("\ntime ratio convert/copy: " + ", ".join(f"{k} {v['time_ratio']:.2f}x" for k, v in summary.items())
              + " (target <= 1.5x)")  # fmt: skip
        if naive:
            m = result["memory"]
            print(f"peak RSS convert/naive: {m['rss_ratio']:.1%} (target <= 25%); above the import floor: "
                  f"{m['rss_ratio_above_imports']:.1%}; outputs agree: {check}")  # fmt: skip
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
