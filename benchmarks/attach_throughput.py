"""Attach throughput and memory: ``python -m caption_mixing attach`` (URL join) against a pandas merge.

Generates img2dataset-style shards (``{key}.jpg`` a tiny JPEG, ``{key}.txt``, ``{key}.json`` with
``url``, ``caption``, ``key``, ``status``, ``width``, ``height``; 1,000 samples per shard) and a
caption CSV keyed by URL covering ~97% of the samples (in another order, plus 3% rows for URLs in
no shard), then joins them, each way in its own process:

- ``attach``: the suite's command (disk-backed SQLite index, shards streamed, staged sidecars);
- ``pandas merge``: the straightforward way: ``pd.read_csv`` the whole file, every sample's
  (key, url) in a DataFrame, one ``merge`` on url, one sidecar per shard. Its shards are read
  with the standard library's ``tarfile`` (what such a script uses) and, separately, with attach's
  own reader, so the join itself can be compared with shard reading costing the same.

Rows/s is samples joined per second of wall time (process start to exit); rows per CPU-second
counts every process's CPU time (attach's readers included), which load on a shared machine
changes less. Peak memory is the larger of the process's ``ru_maxrss`` and its process tree's
proportional set size sampled every 20 ms (attach's reader processes count, pages shared after
fork once). Several ``--rows`` sizes show whether memory stays flat as the
file grows. The last line is ``attach_rows_per_s=`` for the first size.

    python benchmarks/attach_throughput.py --rows 1000000,4000000 --work /tmp/attach_bench

pandas is not a dependency of the suite: ``pip install pandas`` to run the side-by-side merge
(``--no-pandas`` runs attach alone).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

PER_SHARD = 1000
HERE = Path(__file__).resolve().parent
METHODS = {
    "attach": "attach (URL join)",
    "pandas_tarfile": "pandas merge, shards read with tarfile",
    "pandas_scan": "pandas merge, shards read with attach's reader",
}


def _header_template() -> tuple[bytearray, int]:
    h = bytearray(512)
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"00000000000\0"
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    return h, sum(h) - sum(h[124:136])


TEMPLATE, TEMPLATE_SUM = _header_template()


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member (header + data padded to 512), built from a template: fast enough for millions."""
    h = bytearray(TEMPLATE)
    raw = name.encode()
    h[: len(raw)] = raw
    size = b"%011o\0" % len(data)
    h[124:136] = size
    h[148:156] = b"%06o\0 " % (TEMPLATE_SUM + sum(raw) + sum(size))
    return bytes(h) + data + b"\0" * (-len(data) % 512)


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def url_of(i: int) -> str:
    return f"https://img{i % 97}.example.com/photos/{i * 2654435761 % 4294967296:08x}/{i}.jpg"


def generate(folder: Path, rows: int, seed: int = 0) -> tuple[str, Path]:
    """Shards of ``rows`` samples and a caption CSV (97% of them + 3% other URLs, shuffled)."""
    done = folder / "done.json"
    n_shards = -(-rows // PER_SHARD)
    pattern = str(folder / "shards" / f"{{00000..{n_shards - 1:05d}}}.tar")
    if done.exists() and json.loads(done.read_text()) == {"rows": rows, "seed": seed}:
        return pattern, folder / "captions.csv"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "shards").mkdir(parents=True)
    jpg = tiny_jpeg()
    for s in range(n_shards):
        parts = []
        for i in range(s * PER_SHARD, min(rows, (s + 1) * PER_SHARD)):
            key = f"{s:05d}{i % PER_SHARD:04d}"
            meta = {"url": url_of(i), "caption": f"alt {i}", "key": key, "status": "success", "width": 4, "height": 4}
            parts += [
                tar_member(f"{key}.jpg", jpg),
                tar_member(f"{key}.txt", f"alt {i}".encode()),
                tar_member(f"{key}.json", json.dumps(meta).encode()),
            ]
        parts.append(b"\0" * 1024)
        (folder / "shards" / f"{s:05d}.tar").write_bytes(b"".join(parts))
    rng = random.Random(seed)
    order = [i for i in range(rows) if rng.random() < 0.97] + list(range(rows, rows + rows * 3 // 100))
    rng.shuffle(order)
    with (folder / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for i in order:
            w.writerow([url_of(i), f"a dense synthetic caption of image {i}, with several details about its content"])
    done.write_text(json.dumps({"rows": rows, "seed": seed}))
    return pattern, folder / "captions.csv"


def shard_urls(shard: str, reader: str) -> list[tuple[str, str]]:
    """(key, url) of every sample: with the standard library's ``tarfile`` (what a script would use)
    or with attach's own reader (``scan``: headers parsed in Python, unneeded members seeked past)."""
    if reader == "scan":
        from caption_mixing.shards import scan_shard

        return [(s["__key__"], json.loads(s["json"])["url"]) for s in scan_shard(shard, ("json",))]
    out = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                out.append((member.name[: -len(".json")], json.load(tar.extractfile(member))["url"]))
    return out


def pandas_merge(pattern: str, captions: str, out: str, reader: str) -> None:
    """The straightforward join: the whole file and every sample in DataFrames, one merge."""
    import pandas as pd

    from caption_mixing.shards import expand_shards
    from caption_mixing.sidecar import sidecar_path, write_sidecar

    caps = pd.read_csv(captions)
    rows = [(shard, key, url) for shard in expand_shards(pattern) for key, url in shard_urls(shard, reader)]
    samples = pd.DataFrame(rows, columns=["shard", "key", "url"])
    merged = samples.merge(caps.drop_duplicates("url"), on="url", how="left")
    for shard, group in merged.groupby("shard", sort=False):
        found = group.dropna(subset=["caption"])
        captions = dict(zip(found.key, found.caption, strict=True))
        write_sidecar(sidecar_path(shard, "pandas", out), shard, "pandas", captions)


def _tree_pss_kib(pid: int) -> int:
    """Memory of a process and its descendants (reader processes count too), from /proc: the sum of
    their proportional set sizes, so pages a forked reader shares with its parent count once."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            total += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measure(cmd: list[str]) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS MiB of the process tree, output, CPU seconds) of a command in its own process.

    The peak is the larger of the process's own ``ru_maxrss`` and its process tree's memory (PSS,
    sampled every 20 ms: reader processes are separate processes, their memory adds up).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE.parent)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_kib(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output}")
    return wall, max(usage.ru_maxrss, peak[0]) / 1024, output, usage.ru_utime + usage.ru_stime


def best_of(cmd: list[str], repeat: int) -> tuple[float, float, float]:
    """(fastest wall time, largest peak RSS, least CPU time) over ``repeat`` runs: the VM is shared,
    so the fastest run is the one least slowed by other work; CPU time (reader processes included)
    is what the method costs whatever the load."""
    runs = [measure(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[3] for r in runs)


def run_size(
    work: Path, rows: int, with_pandas: bool, workers: int | None, repeat: int = 1, tarfile_max_rows: int = 10**6
) -> dict:
    """Generate (in a child process: a child's peak RSS includes its parent's at fork), then join each way."""
    folder = work / f"rows_{rows}"
    gen, _, out, _ = measure(
        [sys.executable, str(Path(__file__).resolve()), "--generate-worker", str(folder), str(rows)]
    )
    pattern, captions = json.loads(out.strip().splitlines()[-1])
    side = folder / "sidecars"
    shutil.rmtree(side, ignore_errors=True)
    ours = [sys.executable, "-m", "caption_mixing", "attach", "--shards", pattern, "--captions", str(captions)]
    ours += ["--join-on", "url", "--key-field", "url", "--caption-field", "caption", "--name", "ours"]
    ours += ["--sidecar-dir", str(side / "ours"), "--min-coverage", "0.9", "--quiet"]
    ours += [] if workers is None else ["--workers", str(workers)]
    timing = best_of(ours, repeat)
    report = json.loads((side / "ours" / "ours.attach.json").read_text())
    result = {"rows": rows, "generate_s": gen, "attach": timing, "matched": report["matched"]}
    readers = ("tarfile", "scan") if rows <= tarfile_max_rows else ("scan",)
    for reader in readers if with_pandas else ():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--pandas-worker", pattern, str(captions)]
        result[f"pandas_{reader}"] = best_of([*cmd, str(side / f"pandas_{reader}"), reader], repeat)
        got = sum(len(json.loads(p.read_text())["captions"]) for p in (side / f"pandas_{reader}").glob("*.json"))
        if got != report["matched"]:
            raise RuntimeError(f"pandas ({reader}) matched {got} samples, attach {report['matched']}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000000", help="comma list of caption-file sizes (= samples in the shards)")
    p.add_argument("--work", default="/tmp/attach_bench", help="folder for the generated data (reused per size)")
    p.add_argument("--no-pandas", action="store_true", help="attach only")
    p.add_argument("--keep", action="store_true", help="keep the generated data (default: delete each size after)")
    p.add_argument("--workers", type=int, help="attach --workers (default: attach's own choice)")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is reported")
    p.add_argument(
        "--tarfile-max-rows", type=int, default=10**6, help="largest size the (slow) tarfile-read merge runs at"
    )
    p.add_argument("--pandas-worker", nargs=4, metavar=("SHARDS", "CAPTIONS", "OUT", "READER"), help=argparse.SUPPRESS)
    p.add_argument("--generate-worker", nargs=2, metavar=("FOLDER", "ROWS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pandas_worker:
        sys.path.insert(0, str(HERE.parent))
        pandas_merge(*args.pandas_worker)
        return 0
    if args.generate_worker:
        pattern, captions = generate(Path(args.generate_worker[0]), int(args.generate_worker[1]))
        print(json.dumps([pattern, str(captions)]))
        return 0
    if not args.no_pandas and importlib.util.find_spec("pandas") is None:  # not imported here: see run_size
        print("pandas is needed for the side-by-side merge: pip install pandas (or --no-pandas)", file=sys.stderr)
        return 2
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        results.append(
            run_size(Path(args.work), rows, not args.no_pandas, args.workers, args.repeat, args.tarfile_max_rows)
        )
        r = results[-1]
        shown = ", ".join(
            f"{k} {v[0]:.1f}s (CPU {v[2]:.1f}s) {v[1]:.0f}MiB" for k, v in r.items() if isinstance(v, tuple)
        )
        print(f"rows={rows} generate={r['generate_s']:.1f}s {shown}", flush=True)
        if not args.keep:
            shutil.rmtree(Path(args.work) / f"rows_{rows}", ignore_errors=True)
    print("\n| rows | method | rows/s (wall) | rows per CPU-s | peak RSS (process tree) |")
    print("|---|---|---|---|---|")
    for r in results:
        for method in ("attach", "pandas_tarfile", "pandas_scan"):
            if method in r:
                wall, rss, cpu = r[method]
                rates = f"{r['rows'] / wall:,.0f} | {r['rows'] / cpu:,.0f}"
                print(f"| {r['rows']:,} | {METHODS[method]} | {rates} | {rss:.0f} MiB |")
    print(f"attach_rows_per_s={results[0]['rows'] / results[0]['attach'][0]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
